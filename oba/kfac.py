r"""Kronecker-factored curvature (K-FAC) and the Kron-OBD / Kron-OBS channel criteria built on it.

K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) approximates the Fisher block
of one layer by a Kronecker product. Write the layer as :math:`y_t = W a_t` over positions :math:`t`
(one position for ``nn.Linear`` on a ``[B, in]`` input; the :math:`T = H'W'` output pixels of a conv,
:math:`a_t` the unfolded input patch of length :math:`C_\text{in} k_h k_w`, and a trailing 1 when the layer
has a bias), with :math:`W \in \mathbb R^{C_\text{out} \times d_\text{in}}` (``weight.reshape(out, -1)``,
the bias as last column) and :math:`g_{n,t} = \partial \ell_n / \partial y_{n,t}` the output gradient of
sample :math:`n`'s loss. Then, with :math:`\operatorname{vec}` stacking columns,

.. math::

    F_W \approx A \otimes S, \qquad
    A = \mathbb E_{n,t}\,[a_{n,t} a_{n,t}^\top] \in \mathbb R^{d_\text{in}\times d_\text{in}}, \qquad
    S = \mathbb E_n \Bigl[\sum_t g_{n,t} g_{n,t}^\top\Bigr] \in \mathbb R^{C_\text{out}\times C_\text{out}},

exact for one sample of a linear layer (the per-sample gradient :math:`g a^\top` is rank one). The quadratic
form is :math:`\tfrac12\operatorname{vec}(\delta W)^\top (A\otimes S)\operatorname{vec}(\delta W)
= \tfrac12 \operatorname{tr}(\delta W^\top S\, \delta W A)`. Gradients :math:`g_{n,t}` are those of the
targets in the batches (the empirical Fisher) or of labels sampled from the model's softmax
(``sampled=True``, the true Fisher), as in EigenDamage (Wang et al. 2019). Damping adds
:math:`\sqrt\lambda I` to both factors (:math:`\lambda` = ``damping``).

Channel criteria (the costs of removing structures under that quadratic model):

* **Kron-OBD** (diagonal of :math:`A\otimes S`, no compensation): the entry :math:`W_{kj}` costs
  :math:`\tfrac12 W_{kj}^2 S_{kk} A_{jj}`; a structure costs the sum over its entries.
* **Kron-OBS** (optimal compensation of the remaining weights of the same layer): removing output row
  :math:`i` costs :math:`\tfrac12\, w_i^\top A w_i / [S^{-1}]_{ii}` (update
  :math:`\delta W = -S^{-1} e_i w_i^\top / [S^{-1}]_{ii}`); removing the input columns :math:`J` of one
  input channel (its :math:`k_h k_w` kernel taps) costs :math:`\tfrac12 \operatorname{tr}\bigl(
  [(A^{-1})_{JJ}]^{-1} W_J^\top S W_J\bigr)`. A DepGraph group sums these costs over its conv/linear
  layers (the out-rows of the producing layers, the in-columns of the consuming ones).

Only ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers have factors; other layers of a group (BatchNorm,
...) contribute nothing to the K-FAC criteria.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.batches import batch_count, first_checked, to_device
from oba.curvature import Batch, LossFn, curvature_context, split_batch
from oba.group_importance import _CONV_LINEAR_IN as _IN
from oba.group_importance import _CONV_LINEAR_OUT as _OUT
from oba.group_importance import DEFAULT_NORMALIZER, Normalizer, ParameterScoreImportance
from oba.importance import NonFiniteScoreError

__all__ = [
    "KFACFactors",
    "KFACSums",
    "KronImportance",
    "kfac_factor_sums",
    "kfac_factors",
    "kron_obd_cost",
    "kron_obs_cost",
]


@dataclass
class KFACFactors:
    """K-FAC factors of one layer: ``A`` ``[d_in, d_in]`` (bias row/column last), ``S`` ``[C_out, C_out]``."""

    A: Tensor
    S: Tensor
    has_bias: bool
    kernel_size: int  # k_h * k_w (1 for Linear): the number of columns of W per input channel

    def weight_matrix(self, layer: nn.Module) -> Tensor:
        """``W`` as ``[C_out, d_in]``: ``weight.reshape(out, -1)`` with the bias as last column."""
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        return torch.cat([w, layer.bias.detach()[:, None]], 1) if self.has_bias else w


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs as rows ``[B * T, d_in]`` (a trailing 1 for the bias)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"K-FAC supports zero-padded convolutions only, got padding_mode={module.padding_mode!r}")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, d, T]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def _output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``[B, T, C_out]`` from the module output's gradient."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@dataclass
class KFACSums:
    r"""The sums behind the K-FAC factors, before the division by the counts (float64).

    Per layer :math:`\sum_{n,t} a_{n,t} a_{n,t}^\top` (``A``) over ``rows[layer]`` rows and
    :math:`\sum_n \sum_t g_{n,t} g_{n,t}^\top` (``S``) over ``samples`` samples. Sums and counts add up over
    disjoint shards of the batches (:mod:`oba.distributed` all-reduces them); :meth:`factors` divides.
    """

    A: dict[nn.Module, Tensor]
    S: dict[nn.Module, Tensor]
    rows: dict[nn.Module, int]
    samples: int

    def factors(self) -> dict[nn.Module, KFACFactors]:
        """``{layer: KFACFactors}``: ``A / rows``, ``S / samples``, in the layer's dtype."""
        if self.samples == 0:
            raise ValueError("batches is empty: no data to compute K-FAC factors with")
        result = {}
        for m in self.A:
            dtype = m.weight.dtype
            A, S = (self.A[m] / self.rows[m]).to(dtype), (self.S[m] / self.samples).to(dtype)
            result[m] = KFACFactors(A, S, m.bias is not None, m.weight[0, 0].numel())
        return result


def kfac_factors(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    layers: Sequence[nn.Module] | None = None,
    sampled: bool = False,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[nn.Module, KFACFactors]:
    """Accumulate the (undamped) K-FAC factors of every supported layer over ``batches``.

    Args:
        model: run in its current train/eval mode; BatchNorm running statistics are not updated and no hook
            stays attached.
        loss_fn: ``loss_fn(logits, targets)``, the *mean* batch loss (per-sample gradients are its output
            gradients times the batch size).
        layers: the layers to factor (default every ``nn.Linear`` and ungrouped ``nn.Conv2d``).
        sampled: use labels sampled from ``softmax(logits)`` (true Fisher) instead of the batch targets.
        seed: seed of the label sampling.

    Returns:
        ``{layer: KFACFactors}``, each factor the mean over all samples (see the module docstring):
        :meth:`KFACSums.factors` of :func:`kfac_factor_sums`.
    """
    sums = kfac_factor_sums(
        model, loss_fn, batches, layers=layers, sampled=sampled, max_batches=max_batches, seed=seed, progress=progress
    )
    return sums.factors()


def kfac_factor_sums(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    layers: Sequence[nn.Module] | None = None,
    sampled: bool = False,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> KFACSums:
    """The un-normalised K-FAC sums and their counts over ``batches`` (arguments as for :func:`kfac_factors`).

    Empty ``batches`` give zero sums and zero counts (no error; :meth:`KFACSums.factors` raises then).
    """
    layers = [m for m in model.modules() if _supported(m)] if layers is None else list(layers)
    for m in layers:
        if not _supported(m):
            raise TypeError(f"K-FAC factors need nn.Linear or ungrouped nn.Conv2d layers, got {type(m).__name__}")
    if not layers:
        raise ValueError("the model has no nn.Linear / nn.Conv2d layer to compute K-FAC factors for")

    def zeros(n: int, m: nn.Module) -> Tensor:
        return torch.zeros(n, n, dtype=torch.float64, device=m.weight.device)

    sums_a = {m: zeros(m.weight[0].numel() + int(m.bias is not None), m) for m in layers}
    sums_s = {m: zeros(m.weight.shape[0], m) for m in layers}
    rows_a = dict.fromkeys(layers, 0)
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs[module] = args[0].detach()
        out.retain_grad()
        outputs[module] = out

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = 0
    stream = first_checked(model, loss_fn, itertools.islice(iter(batches), max_batches))  # before any hook
    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        with curvature_context(model):
            for index, batch in enumerate(tqdm(
                stream,
                total=batch_count(batches, max_batches),
                desc="K-FAC factors",
                disable=not progress,
            )):  # fmt: skip
                args, targets = split_batch(to_device(batch, device))
                logits = model(*args)
                if sampled:
                    probs = torch.softmax(logits.detach().float(), -1)
                    targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                n = logits.shape[0]
                loss = loss_fn(logits, targets) * n  # sum of per-sample losses: output grads are per sample
                loss.backward(inputs=[outputs[m] for m in layers])
                for m in layers:
                    a = _patches(m, inputs[m])
                    g = _output_grads(m, outputs[m].grad).flatten(0, 1)  # [B * T, C_out]
                    aa, gg = (a.T @ a).double(), (g.T @ g).double()
                    if not (bool(torch.isfinite(aa).all()) and bool(torch.isfinite(gg).all())):
                        raise NonFiniteScoreError(
                            f"batch {index} gave non-finite (NaN or inf) K-FAC factors, first in a "
                            f"{type(m).__name__} with weight {tuple(m.weight.shape)}: check that batch for NaN/inf "
                            "inputs, and the model for diverged weights"
                        )
                    sums_a[m] += aa  # summed in float64 across batches
                    sums_s[m] += gg
                    rows_a[m] += a.shape[0]
                samples += n
                inputs.clear()
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    return KFACSums(sums_a, sums_s, rows_a, samples)


def _damped(f: KFACFactors, damping: float) -> tuple[Tensor, Tensor]:
    eps = damping**0.5
    return (
        f.A + eps * torch.eye(f.A.shape[0], dtype=f.A.dtype, device=f.A.device),
        f.S + eps * torch.eye(f.S.shape[0], dtype=f.S.dtype, device=f.S.device),
    )


def _input_columns(f: KFACFactors, d_in: int) -> Tensor:
    """Column indices ``[C_in, k]`` of ``W`` that belong to each input channel (the bias column excluded)."""
    n_cols = d_in - int(f.has_bias)
    return torch.arange(n_cols).reshape(n_cols // f.kernel_size, f.kernel_size)


def kron_obd_cost(layer: nn.Module, f: KFACFactors, *, out: bool, damping: float = 0.0) -> Tensor:
    r"""Kron-OBD cost of removing each output row (``out=True``) or input channel of ``layer``.

    :math:`\tfrac12 \sum_{(k,j)\in\text{structure}} W_{kj}^2 S_{kk} A_{jj}` with damped factors.
    Returns ``Tensor[C_out]`` or ``Tensor[C_in]``.
    """
    A, S = _damped(f, damping)
    W = f.weight_matrix(layer)
    entry = 0.5 * W**2 * S.diagonal()[:, None] * A.diagonal()[None, :]
    if out:
        return entry.sum(1)
    cols = _input_columns(f, W.shape[1])
    return entry[:, cols].sum((0, 2))


def kron_obs_cost(
    layer: nn.Module, f: KFACFactors, *, out: bool, damping: float = 1e-3, inverse: Tensor | None = None
) -> Tensor:
    r"""Kron-OBS cost of removing each output row (``out=True``) or input channel of ``layer``.

    Row :math:`i`: :math:`\tfrac12 w_i^\top A w_i / [S^{-1}]_{ii}`; input channel with columns :math:`J`:
    :math:`\tfrac12 \operatorname{tr}([(A^{-1})_{JJ}]^{-1} W_J^\top S W_J)`; damped factors (the inverses
    need ``damping > 0`` unless the factors are well conditioned). ``inverse``: the inverse of the damped
    ``S`` (rows) or ``A`` (input channels), when the caller has it already. Returns ``Tensor[C_out]`` or
    ``Tensor[C_in]``.
    """
    A, S = _damped(f, damping)
    W = f.weight_matrix(layer)
    if out:
        s_inv_diag = (torch.linalg.inv(S) if inverse is None else inverse).diagonal()
        return 0.5 * torch.einsum("ij,jk,ik->i", W, A, W) / s_inv_diag
    cols = _input_columns(f, W.shape[1])  # [C_in, k]
    a_inv = torch.linalg.inv(A) if inverse is None else inverse
    blocks = a_inv[cols[:, :, None], cols[:, None, :]]  # [C_in, k, k]: (A^-1)_JJ per input channel
    WJ = W[:, cols].permute(1, 0, 2)  # [C_in, C_out, k]
    M = WJ.transpose(1, 2) @ S @ WJ  # [C_in, k, k]: W_J^T S W_J
    return 0.5 * torch.linalg.solve(blocks, M).diagonal(dim1=1, dim2=2).sum(1)


class KronImportance(ParameterScoreImportance):
    """Torch-Pruning importance of a group from K-FAC costs (Kron-OBD or Kron-OBS, module docstring).

    Each conv/linear dependency of the group contributes the cost of removing its rows (out-channel
    pruning) or input channels (in-channel pruning); the group's channel importance is their sum (or the
    other ``group_reduction`` s of :class:`oba.group_importance.ParameterScoreImportance`), then normalised. Layers
    without factors (BatchNorm, ...) contribute nothing.

    Args:
        model: the model being pruned.
        factors: ``{layer: KFACFactors}`` from :func:`kfac_factors` on the current model.
        kind: ``"obd"`` or ``"obs"``.
        damping: :math:`\\lambda` (each factor gets :math:`\\sqrt\\lambda I`).
    """

    def __init__(
        self,
        model: nn.Module,
        factors: dict[nn.Module, KFACFactors],
        kind: str = "obs",
        *,
        damping: float = 1e-3,
        group_reduction: str = "sum",
        normalizer: Normalizer = DEFAULT_NORMALIZER,
    ) -> None:
        if kind not in ("obd", "obs"):
            raise ValueError(f"kind must be 'obd' or 'obs', got {kind!r}")
        super().__init__(model, {}, group_reduction=group_reduction, normalizer=normalizer, absolute=True)
        self.factors = factors
        self.kind = kind
        self.damping = damping
        self._inverses: dict[tuple[nn.Module, bool], Tensor] = {}  # (layer, out) -> inverse damped S or A

    def _channel_scores(self, dep: Any) -> Tensor | None:
        layer = dep.target.module
        f = self.factors.get(layer)
        fn = dep.handler
        if f is None or not (fn in _OUT or fn in _IN):
            return None
        rows = layer.weight.shape[0]
        if f.S.shape[0] != rows:
            raise RuntimeError(
                f"K-FAC factors of a {type(layer).__name__} are for {f.S.shape[0]} output channels but the layer "
                f"now has {rows}: the model was pruned after the factors were computed; recompute them."
            )
        out = fn in _OUT
        if self.kind == "obd":
            return kron_obd_cost(layer, f, out=out, damping=self.damping)
        if (layer, out) not in self._inverses:
            self._inverses[layer, out] = torch.linalg.inv(_damped(f, self.damping)[1 if out else 0])
        return kron_obs_cost(layer, f, out=out, damping=self.damping, inverse=self._inverses[layer, out])

    def _crossing(self, layer: nn.Module, out: Any, inp: Any) -> tuple[Tensor, Tensor]:
        # Costs of rows and columns are not sums over entries: nothing to take off.
        values, pos = out
        return torch.zeros(len(pos), dtype=self.factors[layer].A.dtype), pos
