"""oba: Hessian-based neural-network pruning (Optimal Brain Apoptosis and the OBD/OBS family).

The curvature engine (``oba.hvp``, ``oba.hessian``, ...), the criteria (``oba.score``, ``oba.make_scorer``; the
registry is :mod:`oba.criteria`) and structured pruning (``oba.prune_structured``, ``oba.save_pruned``,
``oba.load_pruned``) are re-exported here; the other modules are imported by name: ``oba.data``, ``oba.models``,
``oba.train``, ``oba.flops``, ``oba.toynets``, ...
"""

from oba.criteria import make_scorer, names, score
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
from oba.prune import prune_structured
from oba.pruned_io import load_pruned, save_pruned

__version__ = "0.1.0"

CRITERIA: tuple[str, ...] = names("parameter")
"""The criteria :func:`score` accepts (a view of the registry :mod:`oba.criteria`)."""

__all__ = [
    "CRITERIA",
    "load_pruned",
    "make_scorer",
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
