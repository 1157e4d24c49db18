"""oba: Hessian-based neural-network pruning (Optimal Brain Apoptosis and the OBD/OBS family).

The curvature engine (``oba.hvp``, ``oba.hessian``, ...) and the importance criteria (``oba.score``) are
re-exported here; the other modules are imported by name: ``oba.data``, ``oba.models``, ``oba.train``,
``oba.flops``, ``oba.toynets``.
"""

from oba.curvature import (
    curvature_context,
    empirical_fisher_vp,
    finite_difference_hvp,
    flatten_params,
    ggn_vp,
    gradient,
    hessian,
    hessian_diagonal,
    hvp,
    param_slices,
    per_sample_gradients,
    select_params,
    unflatten_params,
)
from oba.importance import CRITERIA, score
from oba.prune import load_pruned, prune_structured, save_pruned

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "load_pruned",
    "prune_structured",
    "save_pruned",
    "score",
    "curvature_context",
    "empirical_fisher_vp",
    "finite_difference_hvp",
    "flatten_params",
    "ggn_vp",
    "gradient",
    "hessian",
    "hessian_diagonal",
    "hvp",
    "param_slices",
    "per_sample_gradients",
    "select_params",
    "unflatten_params",
]
