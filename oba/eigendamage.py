r"""EigenDamage (Wang et al., ICML 2019): structured pruning in the Kronecker-factored eigenbasis (KFE).

The quadratic model
-------------------
K-FAC (:mod:`oba.kfac`) approximates the Fisher block of a layer :math:`y = W x + b` by :math:`A \otimes S`:
:math:`A` the second moment of the layer inputs, :math:`S` that of the output gradients. EigenDamage uses the
*true* Fisher (gradients of labels sampled from the model's softmax, ``kfac_factors(..., sampled=True)``).
With the eigendecompositions :math:`A = Q_A \operatorname{diag}(a) Q_A^\top`, :math:`S = Q_S
\operatorname{diag}(s) Q_S^\top` (orthogonal :math:`Q`) and the rotated weight

.. math::

    W' = Q_S^\top W Q_A, \qquad W = Q_S W' Q_A^\top,

the Fisher of :math:`W'` is :math:`\operatorname{diag}(a) \otimes \operatorname{diag}(s)`: diagonal. So OBD is
exact for the K-FAC model in these coordinates: setting :math:`W'_{ij}` to zero costs
:math:`\tfrac12 W'^2_{ij} s_i a_j` (gradient taken as zero at a trained model).

The reparametrisation
---------------------
Each layer becomes an :class:`EigenbasisLayer`, three ordinary layers in a row that compute the same function:

.. math::

    x \xrightarrow{\ \texttt{rotate\_in}:\ Q_A^\top\ } x' \xrightarrow{\ \texttt{core}:\ W'\ } z'
      \xrightarrow{\ \texttt{rotate\_out}:\ Q_S,\ +b\ } y = Q_S W' Q_A^\top x + b = W x + b.

Shapes (``n, m`` features, ``C, D`` channels, :math:`W` ``[m, n]`` or ``[D, C, k_h, k_w]``):

* ``nn.Linear(n, m)``: ``rotate_in = Linear(n, n)`` with weight :math:`Q_A^\top`; ``core = Linear(n, m)``
  with weight :math:`W'` ``[m, n]``; ``rotate_out = Linear(m, m)`` with weight :math:`Q_S` and the bias.
* ``nn.Conv2d(C, D, k)``: ``rotate_in`` a 1x1 ``Conv2d(C, C)`` with weight :math:`Q_A^\top`; ``core`` a
  k x k ``Conv2d(C, D)`` with :math:`W'[:, :, u, v] = Q_S^\top W[:, :, u, v] Q_A` for every tap
  :math:`(u, v)`; ``rotate_out`` a 1x1 ``Conv2d(D, D)`` with weight :math:`Q_S` and the bias.

The core keeps the stride, padding, dilation and padding mode of the original layer; the rotations have no
bias (``rotate_out`` carries the original bias, in the original output basis). A 1x1 channel rotation commutes
with padding and with the k x k sliding window (both act on each channel alone), so the core sees exactly the
rotated patches.

Convolutions: a channel-level input factor. K-FAC's input factor of a convolution is over patches
(:math:`C k_h k_w` rows, :mod:`oba.kfac`), and a rotation of the patch space is not a 1x1 convolution. As the
public EigenDamage code does for the layers it reparametrises (its "patch" input statistics), the input factor
is taken over channels, every kernel tap counted as one more sample of the input-channel vector:

.. math::

    A_\text{ch}[c, c'] = \frac{1}{k_h k_w} \sum_{t} A[(c, t), (c', t)],
    \qquad A \approx A_\text{ch} \otimes I_{k_h k_w},

so the core entry :math:`(i, j, t)` (output eigen-channel :math:`i`, input eigen-channel :math:`j`, tap
:math:`t`) costs :math:`\tfrac12 W'^2_{ijt} s_i a_j`. For ``nn.Linear`` :math:`A_\text{ch} = A`. Only the
weight block of :math:`A` is used (the bias row and column dropped): the weight block of :math:`A \otimes S` is
exactly :math:`A_{ww} \otimes S`, and the bias is never pruned.

What is pruned
--------------
Only the *inner* (eigen-)channels: the outputs of ``rotate_in`` (input eigen-channels :math:`j`, pruned
together with the core's inputs) and the outputs of the core (output eigen-channels :math:`i`, pruned together
with ``rotate_out``'s inputs), with costs

.. math::

    c_\text{out}(i) = \tfrac12\, s_i \sum_{j,t} W'^2_{ijt} a_j, \qquad
    c_\text{in}(j) = \tfrac12\, a_j \sum_{i,t} W'^2_{ijt} s_i,

the EigenDamage importances (the row and column sums of the entry costs). They are computed as Kron-OBD of the
core (:class:`oba.kfac.KronImportance` with ``kind="obd"``) with the factors of the new basis,
:math:`\operatorname{diag}(a) \otimes I_{k_h k_w}` and :math:`\operatorname{diag}(s)`: in the eigenbasis the
K-FAC Fisher is diagonal, so the diagonal (OBD) rule drops nothing of it, and Kron-OBS would give the same
costs. The outer channels (inputs of ``rotate_in``, outputs of ``rotate_out``: residual streams, BatchNorm,
neighbouring layers) keep their width: :func:`eigenbasis_ignored_layers` lists every ``rotate_out`` (and every
layer that was not reparametrised) for the pruner, and a group without a core layer gets no score.

Re-scoring. :func:`eigendamage_importance` runs before every pruning step of :func:`oba.prune_structured`:
it computes the K-FAC factors of the core layers on the step's batches, then rotates every
:class:`EigenbasisLayer` in place, without changing its function, into the eigenbasis of those factors
(:meth:`EigenbasisLayer.rotate_`: with :math:`A' = U_A \operatorname{diag}(a) U_A^\top`,
:math:`S' = U_S \operatorname{diag}(s) U_S^\top` the factors of the core in its current basis,
``rotate_in`` :math:`\leftarrow U_A^\top` ``rotate_in``, ``core`` :math:`\leftarrow U_S^\top` ``core``
:math:`U_A`, ``rotate_out`` :math:`\leftarrow` ``rotate_out`` :math:`U_S`), and scores in that basis. The
public code's iterative mode merges a new eigenbasis into the old rotations the same way. So
:func:`to_eigenbasis` needs no data (without factors it builds identity rotations; the first scoring step
rotates into the KFE of the dense model), and every step prunes in the eigenbasis of the current model.

FLOPs. A reparametrised conv at input size :math:`H \times W` and output size :math:`H' \times W'` costs
:math:`C r_\text{in} HW + r_\text{out} r_\text{in} k^2 H'W' + D r_\text{out} H'W'` MACs against
:math:`D C k^2 H'W'` for the dense layer (:math:`r` the inner widths): the unpruned KFE model is *more*
expensive (about 1.2x for a CIFAR ResNet-20), so FLOPs targets are measured against the dense model
(``prune_structured(model, x, "eigendamage", ...)`` measures against the model as given, before
:class:`EigenbasisPreparation` reparametrises it) and reaching them takes
heavy inner pruning (inner widths near half at 0.4 of the dense FLOPs). A layer with far more inputs than
outputs (the first layer of an MNIST MLP, 784 -> 40) pays more for its input rotation than for the layer
itself; leave such layers out with ``layers=``.

Choices against the public code (github alecwangcq/EigenDamage-Pytorch): channels are removed by this
project's pruner (global ranking, FLOPs targets, re-scoring steps) instead of a global fraction of
eigen-channels; every conv/linear layer but the classifier is reparametrised (the public code also leaves the
last layer alone) and stays reparametrised (the public code falls back to the dense layer where the pruned
bottleneck would be larger); the rotations are ordinary trainable parameters during fine-tuning (its CIFAR
configurations train them too); no damping (negative eigenvalues from round-off are set to zero). Costs are
divided by their group's mean before the global ranking (``normalizer="mean"``, as every other criterion of
:mod:`oba.criteria`), although the public configurations rank raw costs
(``normalize: false``): on the pretrained CIFAR-10 ResNet-20 with this pruner (5 scoring batches of 64 per
step, one step per target, 1,017 lossless test images, no fine-tuning), raw costs kept 30 % / 32 % / 12 %
accuracy at 0.8 / 0.6 / 0.4 of the FLOPs against 60 % / 16 % / 9 % with the mean, and 34 % / 31 % / 21 %
against 70 % / 66 % / 47 % after recomputing the BatchNorm statistics. ``normalizer=None`` gives raw costs.

Only ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers can be reparametrised; a grouped or depthwise
convolution among the requested layers raises a ``ValueError`` (pass ``layers=`` without it: it then stays a
plain, unpruned layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oba.curvature import Batch, LossFn
from oba.group_importance import DEFAULT_NORMALIZER, Normalizer
from oba.kfac import KFACFactors, KronImportance, kfac_factors

__all__ = [
    "EigenbasisLayer",
    "EigenbasisPreparation",
    "channel_input_factor",
    "eigenbasis_ignored_layers",
    "eigenbasis_layers",
    "eigendamage_costs",
    "eigendamage_importance",
    "to_eigenbasis",
]


class EigenbasisLayer(nn.Module):
    """A conv/linear layer written as ``rotate_out(core(rotate_in(x)))`` (module docstring: shapes and math).

    Build it with :meth:`from_layer` (identity rotations, ``core`` a copy of the layer); :meth:`rotate_`
    moves it into an eigenbasis without changing its function.
    """

    def __init__(self, rotate_in: nn.Module, core: nn.Module, rotate_out: nn.Module) -> None:
        super().__init__()
        self.rotate_in = rotate_in
        self.core = core
        self.rotate_out = rotate_out

    @classmethod
    def from_layer(cls, layer: nn.Module) -> EigenbasisLayer:
        """The same function as ``layer`` with identity rotations: ``rotate_in = I``, ``core = W``, ``rotate_out
        = I`` with the bias. Parameters are new tensors (same dtype and device as ``layer``'s)."""
        _check_supported(layer)
        w = layer.weight.detach()
        kw = {"dtype": w.dtype, "device": w.device}
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            n, m = layer.in_features, layer.out_features
            rotate_in, rotate_out = nn.Linear(n, n, bias=False, **kw), nn.Linear(m, m, bias=bias, **kw)
            core = nn.Linear(n, m, bias=False, **kw)
        else:
            c, d = layer.in_channels, layer.out_channels
            rotate_in, rotate_out = nn.Conv2d(c, c, 1, bias=False, **kw), nn.Conv2d(d, d, 1, bias=bias, **kw)
            core = nn.Conv2d(
                c, d, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                bias=False, padding_mode=layer.padding_mode, **kw,
            )  # fmt: skip
        with torch.no_grad():
            rotate_in.weight.copy_(_as_weight(torch.eye(rotate_in.weight.shape[0], **kw), rotate_in))
            rotate_out.weight.copy_(_as_weight(torch.eye(rotate_out.weight.shape[0], **kw), rotate_out))
            core.weight.copy_(w)
            if bias:
                rotate_out.bias.copy_(layer.bias.detach())
        return cls(rotate_in, core, rotate_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.rotate_out(self.core(self.rotate_in(x)))

    def output_width(self) -> int:
        """The width this layer presents to the rest of the model (``rotate_out``'s outputs), which
        :func:`oba.prunable.layer_widths` reports under the layer's own name."""
        return int(self.rotate_out.weight.shape[0])

    @property
    def inner_widths(self) -> tuple[int, int]:
        """``(r_in, r_out)``: the input and output eigen-channels the core still has."""
        return int(self.core.weight.shape[1]), int(self.core.weight.shape[0])

    @torch.no_grad()
    def rotate_(self, A: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        r"""Rotate into the eigenbasis of the core's current factors, in place, keeping the function.

        Args:
            A: channel-level input factor of the core, ``[r_in, r_in]`` (:func:`channel_input_factor`).
            S: output factor of the core, ``[r_out, r_out]``.

        With :math:`A = U_A \operatorname{diag}(a) U_A^\top` and :math:`S = U_S \operatorname{diag}(s)
        U_S^\top`: ``rotate_in`` :math:`\leftarrow U_A^\top` ``rotate_in``, ``core`` :math:`\leftarrow U_S^\top`
        ``core`` :math:`U_A` (every tap), ``rotate_out`` :math:`\leftarrow` ``rotate_out`` :math:`U_S`. The
        factors of the rotated core are then :math:`\operatorname{diag}(a)` and :math:`\operatorname{diag}(s)`.
        Computed in float64.

        Returns:
            ``(a, s)``: the eigenvalues (``Tensor[r_in]``, ``Tensor[r_out]``, negatives from round-off set to 0),
            in the new order of the eigen-channels, in the core's dtype.
        """
        r_in, r_out = self.inner_widths
        if A.shape != (r_in, r_in) or S.shape != (r_out, r_out):
            raise ValueError(
                f"factors of shapes {tuple(A.shape)} and {tuple(S.shape)} do not fit a core with {r_in} input and "
                f"{r_out} output eigen-channels; compute them on the current model (the layer was pruned since?)"
            )
        a, u_a = torch.linalg.eigh(A.double())
        s, u_s = torch.linalg.eigh(S.double())
        r_i = self.rotate_in.weight.double().flatten(1)  # [r_in, C]
        core = self.core.weight.double()  # [r_out, r_in, ...]
        r_o = self.rotate_out.weight.double().flatten(1)  # [D, r_out]
        core = torch.einsum("oi...,oa,ib->ab...", core, u_s, u_a)  # U_S^T core U_A, tap by tap
        self.rotate_in.weight.copy_((u_a.T @ r_i).reshape(self.rotate_in.weight.shape))
        self.core.weight.copy_(core)
        self.rotate_out.weight.copy_((r_o @ u_s).reshape(self.rotate_out.weight.shape))
        dtype = self.core.weight.dtype
        return a.clamp_min(0).to(dtype), s.clamp_min(0).to(dtype)


def _check_supported(layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"EigenDamage cannot reparametrise a grouped/depthwise Conv2d (groups={layer.groups}): K-FAC "
                "factors and channel rotations need a dense channel mixing. Pass layers=[...] without it; it then "
                "stays a plain layer whose channels EigenDamage does not prune."
            )
        return
    raise ValueError(
        f"EigenDamage reparametrises nn.Linear and ungrouped nn.Conv2d layers only, got {type(layer).__name__}; "
        "pass layers=[...] with supported layers"
    )


def _as_weight(matrix: Tensor, layer: nn.Module) -> Tensor:
    """A ``[out, in]`` matrix as the weight of ``layer`` (1x1 kernel for a conv)."""
    return matrix.reshape(layer.weight.shape)


# ------------------------------------------------------------------------------------------ structure
def eigenbasis_layers(model: nn.Module) -> dict[str, EigenbasisLayer]:
    """``{name: EigenbasisLayer}`` of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EigenbasisLayer)}


def _default_layers(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` outside an :class:`EigenbasisLayer`, but the last ``nn.Linear``."""
    inside = {id(p) for m in eigenbasis_layers(model).values() for p in m.modules()}
    found = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside]
    linears = [m for m in found if isinstance(m, nn.Linear)]
    return [m for m in found if not (linears and m is linears[-1])]


def to_eigenbasis(
    model: nn.Module,
    factors: dict[nn.Module, KFACFactors] | None = None,
    *,
    layers: Iterable[nn.Module] | None = None,
) -> nn.Module:
    """Replace layers of ``model`` (in place) by :class:`EigenbasisLayer` s computing the same function.

    Args:
        model: modified in place and returned.
        factors: K-FAC factors of the layers (:func:`oba.kfac.kfac_factors` on ``model``, ``sampled=True`` for
            EigenDamage's true Fisher): each layer is rotated into its KFE, ``W' = Q_S^T W Q_A``. Without
            factors the rotations are identities (:func:`eigendamage_importance` rotates before scoring).
        layers: the layers to reparametrise (default: every ``nn.Linear`` / ``nn.Conv2d`` that is not already
            part of an :class:`EigenbasisLayer`, except the last ``nn.Linear``, the classifier). Layers already
            reparametrised (an :class:`EigenbasisLayer` or one of its parts) are left as they are, so calling it
            again is harmless.

    Raises:
        ValueError: a layer is not an ``nn.Linear`` or ungrouped ``nn.Conv2d``, is not part of ``model``, or has
            no factors (when ``factors`` is given).
    """
    chosen = _default_layers(model) if layers is None else list(layers)
    chosen = [layer for layer in chosen if not isinstance(layer, EigenbasisLayer)]  # already reparametrised
    for layer in chosen:
        _check_supported(layer)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for layer in chosen:
        if id(layer) not in parents:
            raise ValueError(f"a {type(layer).__name__} to reparametrise is not a submodule of the model")
        parent, name = parents[id(layer)]
        if isinstance(parent, EigenbasisLayer):
            continue  # already one of the three parts of a reparametrised layer
        new = EigenbasisLayer.from_layer(layer)
        new.train(layer.training)
        if factors is not None:
            if layer not in factors:
                raise ValueError(
                    f"no K-FAC factors for a {type(layer).__name__} to reparametrise: compute them on this model "
                    "(kfac_factors(model, ..., layers=...)) for every layer, or pass layers=[...]"
                )
            new.rotate_(channel_input_factor(factors[layer]), factors[layer].S)
        setattr(parent, name, new)
    return model


def eigenbasis_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output channels EigenDamage must not prune: every ``nn.Linear`` / ``nn.Conv2d`` but the
    ``rotate_in`` and ``core`` of the :class:`EigenbasisLayer` s (so only eigen-channels are pruned)."""
    inner = {id(m) for e in eigenbasis_layers(model).values() for m in (e.rotate_in, e.core)}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inner]


# ------------------------------------------------------------------------------------------ costs
def channel_input_factor(f: KFACFactors) -> Tensor:
    r"""The channel-level input factor ``[C_in, C_in]`` from K-FAC patch factors (module docstring):
    :math:`A_\text{ch}[c, c'] = \frac{1}{k}\sum_t A[(c, t), (c', t)]` over the ``k`` kernel taps, bias row and
    column dropped (``nn.Linear``: ``k = 1``, ``A`` without the bias)."""
    n = f.A.shape[0] - int(f.has_bias)
    k = f.kernel_size
    A = f.A[:n, :n].reshape(n // k, k, n // k, k)
    return torch.einsum("itjt->ij", A) / k


def eigendamage_costs(layer: EigenbasisLayer, a: Tensor, s: Tensor, *, out: bool) -> Tensor:
    r"""EigenDamage costs of the core's eigen-channels when its factors are ``diag(a)``, ``diag(s)``.

    ``out=True``: :math:`c(i) = \tfrac12 s_i \sum_{j,t} W'^2_{ijt} a_j` (``Tensor[r_out]``); else
    :math:`c(j) = \tfrac12 a_j \sum_{i,t} W'^2_{ijt} s_i` (``Tensor[r_in]``). The reference formula;
    :func:`eigendamage_importance` gets the same numbers through :class:`oba.kfac.KronImportance`.
    """
    w2 = layer.core.weight.detach().pow(2).reshape(*layer.core.weight.shape[:2], -1).sum(2)  # [r_out, r_in]
    entry = 0.5 * w2 * s[:, None] * a[None, :]
    return entry.sum(1) if out else entry.sum(0)


def _diagonal_factors(layer: EigenbasisLayer, a: Tensor, s: Tensor) -> KFACFactors:
    """K-FAC factors of the rotated core in :mod:`oba.kfac`'s patch layout: ``diag(a) ⊗ I_taps``, ``diag(s)``."""
    k = layer.core.weight[0, 0].numel()
    A = torch.kron(torch.diag(a), torch.eye(k, dtype=a.dtype, device=a.device))
    return KFACFactors(A, torch.diag(s), has_bias=False, kernel_size=k)


def eigendamage_importance(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    sampled: bool = True,
    damping: float = 0.0,
    seed: int = 0,
    normalizer: Normalizer = DEFAULT_NORMALIZER,
    group_reduction: str = "sum",
    progress: bool = False,
    factor_fn: Callable[..., dict[nn.Module, KFACFactors]] = kfac_factors,
) -> KronImportance:
    """One pruning step's importance of a model reparametrised by :func:`to_eigenbasis`.

    K-FAC factors of every core on ``batches`` (``sampled=True``: the true Fisher, labels drawn from the model
    with ``seed``), every :class:`EigenbasisLayer` rotated into their eigenbasis (:meth:`EigenbasisLayer.rotate_`,
    function unchanged), then the EigenDamage costs as :class:`oba.kfac.KronImportance` (``kind="obd"``) of the
    cores. Groups of outer channels hold no core and get ``None`` (never pruned). The registry entry
    ``"eigendamage"`` (:mod:`oba.criteria`) calls it at every step of :func:`oba.prune_structured`.

    Args:
        damping: added as in :mod:`oba.kfac` (each factor gets ``sqrt(damping) I``); EigenDamage uses none.
        normalizer, group_reduction: as in :class:`oba.group_importance.ParameterScoreImportance` (``None``: raw
            costs; module docstring for the default).
        factor_fn: computes the K-FAC factors, called as :func:`oba.kfac.kfac_factors` (default);
            :func:`oba.distributed.kfac_factors` all-reduces them over the processes of ``torch.distributed``.
    """
    kfe = list(eigenbasis_layers(model).values())
    if not kfe:
        raise ValueError(
            "EigenDamage prunes the eigen-channels of a reparametrised model, and this one has no EigenbasisLayer: "
            "call oba.eigendamage.to_eigenbasis(model) first, or prune with "
            'oba.prune_structured(model, x, "eigendamage")'
        )
    cores = [e.core for e in kfe]
    factors = factor_fn(model, loss_fn, batches, layers=cores, sampled=sampled, seed=seed, progress=progress)
    diagonal = {}
    for e in kfe:
        a, s = e.rotate_(channel_input_factor(factors[e.core]), factors[e.core].S)
        diagonal[e.core] = _diagonal_factors(e, a, s)
    return KronImportance(
        model, diagonal, "obd", damping=damping, group_reduction=group_reduction, normalizer=normalizer
    )


class EigenbasisPreparation:
    """EigenDamage's plug-in for the pruner (:class:`oba.criteria.Preparation`): before the first step the model
    is reparametrised in place (:func:`to_eigenbasis`; harmless on layers already reparametrised, as in later
    stages of the iterative protocol) and only eigen-channels prune (:func:`eigenbasis_ignored_layers`); FLOPs
    are measured against the model as given, before the reparametrisation, which has more FLOPs than it."""

    name = "eigenbasis_layers"

    def prepare(
        self, model: nn.Module, ignored_layers: Sequence[nn.Module] | None, layers: Iterable[nn.Module] | None = None
    ) -> list[nn.Module]:
        """Reparametrise ``layers`` (default :func:`to_eigenbasis`'s) and return the layers the pruner ignores."""
        if ignored_layers is not None:
            raise ValueError(
                "EigenDamage prunes only eigen-channels and sets ignored_layers itself; choose the layers to "
                "reparametrise with the criterion option layers=[...] (oba.criteria.make_scorer) instead"
            )
        to_eigenbasis(model, layers=layers)
        return eigenbasis_ignored_layers(model)

    def prepared_layers(self, model: nn.Module) -> list[str]:
        """Names of the reparametrised layers (what a saved pruned model must rebuild before loading weights)."""
        return list(eigenbasis_layers(model))

    def restore(self, model: nn.Module, names: Sequence[str]) -> None:
        """Reparametrise the named layers of a fresh model (identity rotations; the saved weights follow)."""
        to_eigenbasis(model, layers=[model.get_submodule(name) for name in names])

    def split_widths(self, model: nn.Module, widths: Mapping[str, int]) -> dict[str, Any]:
        """``{"widths": ...}`` under the original layer names (what every other criterion reports) and the widths of
        the reparametrised layers' parts under ``"inner_widths"``."""
        parts = {f"{n}.{part}" for n in eigenbasis_layers(model) for part in ("rotate_in", "core", "rotate_out")}
        out: dict[str, Any] = {"widths": {k: v for k, v in widths.items() if k not in parts}}
        if parts:
            out["inner_widths"] = {k: v for k, v in widths.items() if k in parts}
        return out
