"""oba: Hessian-based neural-network pruning (Optimal Brain Apoptosis and the OBD/OBS family).

The curvature engine is re-exported here (``oba.hvp``, ``oba.hessian``, ...); the other modules are
imported by name: ``oba.data``, ``oba.models``, ``oba.train``, ``oba.flops``, ``oba.toynets``.
"""

from oba.curvature import (
    curvature_context,
    empirical_fisher_vp,
    finite_difference_hvp,
    flatten_params,
    ggn_vp,
    gradient,
    hessian,
    hvp,
    param_slices,
    per_sample_gradients,
    select_params,
    unflatten_params,
)

__version__ = "0.1.0"

__all__ = [
    "curvature_context",
    "empirical_fisher_vp",
    "finite_difference_hvp",
    "flatten_params",
    "ggn_vp",
    "gradient",
    "hessian",
    "hvp",
    "param_slices",
    "per_sample_gradients",
    "select_params",
    "unflatten_params",
]
