r"""Exact curvature of the mini-batch loss: Hessian-, Gauss-Newton- and Fisher-vector products.

Notation. A model :math:`f_\theta` maps a batch of inputs :math:`X = (x_1..x_N)` to outputs
:math:`z = f_\theta(X)`; ``loss_fn(z, y)`` is the *mean* mini-batch loss

.. math::  L(\theta) = \tfrac1N \textstyle\sum_n \ell(f_\theta(x_n), y_n)

(any callable works; the formulas below assume the usual ``reduction="mean"``). Parameters are
addressed by their names in ``model.named_parameters()`` and passed around as ``dict[str, Tensor]``;
``params`` selects a subset (names or parameter objects, default: every parameter with
``requires_grad``). Every function here is *exact* (no sampling) and works in float32 and float64.

Functions and what they compute (``v`` a dict shaped like the selected parameters):

* :func:`gradient`        :math:`g = \nabla_\theta L`
* :func:`hvp`             :math:`H v`, :math:`H = \nabla^2_\theta L`, forward-over-reverse
  (``torch.func.jvp`` of ``torch.func.grad``: Pearlmutter's trick, one pass, about 2-4 gradients)
* :func:`hessian`         the dense :math:`P \times P` matrix :math:`H` (small models only), as
  ``vmap`` over the pullback of the gradient (reverse-over-reverse), one row per basis vector
* :func:`hessian_diagonal` :math:`\mathrm{diag}(H)`, exact (small models) or Hutchinson's estimate
* :func:`ggn_vp`          :math:`G v = J^\top (\nabla^2_z \ell) J v`, :math:`J = \partial z/\partial\theta`
  (generalised Gauss-Newton: one JVP, the loss Hessian in output space, one VJP)
* :func:`per_sample_gradients`  :math:`g_n = \nabla_\theta \ell(f_\theta(x_n), y_n)`, shape ``[N, *p.shape]``
* :func:`empirical_fisher_vp`   :math:`F v = \tfrac1N \sum_n g_n (g_n^\top v) = G^\top G v / N`
* :func:`finite_difference_hvp` :math:`(g(\theta + \epsilon v) - g(\theta - \epsilon v)) / 2\epsilon`,
  an oracle that shares no second-order code path with PyTorch (used by the tests and notebooks)

PyTorch traps handled by :func:`curvature_context` (entered by every function here):

* ``torch.func.hessian`` (vmapped forward-over-reverse) and ``jacrev(jacrev(.))`` return WRONG Hessians
  for models with ``layer_norm`` or train-mode ``batch_norm`` (measured on torch 2.13-2.15, CPU: absolute
  errors of 0.1-0.2 and an asymmetric matrix). A single unbatched ``jvp(grad(.))`` and ``vmap`` over a
  reverse-mode pullback are right, so :func:`hvp` uses the former and :func:`hessian` the latter;
  ``tests/test_curvature.py`` keeps a test that notices when PyTorch fixes the broken path.
* The CPU flash kernel of ``scaled_dot_product_attention`` (``nn.MultiheadAttention``, torchvision's
  ViT) has neither forward-mode nor double-backward derivatives: the math backend is selected.
* Train-mode BatchNorm would update its running statistics in place (which ``torch.func`` transforms
  refuse, and which would corrupt the model): running statistics are switched off for the duration, so
  batch statistics are used exactly as in a training step and the buffers are left untouched.
* ``hardsigmoid`` (MobileNetV3's squeeze-excitation gate, in torchvision and timm) has no derivative of its
  backward (neither double backward nor forward-mode): inside the context ``F.hardsigmoid`` (and so
  ``nn.Hardsigmoid``) is computed as :math:`\mathrm{hardtanh}(x + 3, 0, 6) / 6`, the same values bit for bit
  (float16/bfloat16 computed in float32, as PyTorch's kernel does) and the same first derivative (0 at
  :math:`x = \pm 3`), which has second derivatives (zero almost everywhere). In float64 its slope is exactly
  1/6, where PyTorch's own backward returns 1/6 rounded to float32. ``hardswish`` and the other activations of
  the torchvision and timm models have double-backward and forward-mode derivatives of their own.
* Full backward hooks (``register_full_backward_hook``, BackPACK's ``extend``) break ``torch.func``:
  they are detached for the duration and put back afterwards. Forward (pre-)hooks stay active, so
  ``torch.nn.utils.prune`` reparametrisations (``weight = weight_orig * weight_mask``) work; the
  curvature is then w.r.t. ``weight_orig``.

Everything the context changes is restored when it exits, also after an exception.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from oba.batches import LossFn, split_batch
from oba.standardization import closed_form_batch_norm

__all__ = [
    "Batch",
    "LossFn",
    "Params",
    "curvature_context",
    "empirical_fisher_vp",
    "finite_difference_hvp",
    "flatten_params",
    "ggn_vp",
    "gradient",
    "hessian",
    "hessian_diagonal",
    "hvp",
    "loss_function",
    "param_slices",
    "per_sample_gradients",
    "select_params",
    "unflatten_params",
]

Params = dict[str, Tensor]
Batch = tuple  # (inputs, targets); inputs a Tensor or a tuple of Tensors passed as positional args

#: Above this many parameters :func:`hessian` refuses unless ``force=True`` (P^2 float64 = 800 MB).
DEFAULT_MAX_HESSIAN_PARAMS = 10_000


# --------------------------------------------------------------------------------------------------
# Parameter dictionaries
# --------------------------------------------------------------------------------------------------
def select_params(model: nn.Module, params: Iterable[str | Tensor] | Mapping[str, Tensor] | None = None) -> Params:
    """Detached copies-by-reference of the chosen named parameters, in ``named_parameters()`` order.

    ``params``: ``None`` (every parameter with ``requires_grad``), an iterable of names, an iterable of
    parameter objects of ``model``, or a dict whose keys are names. Unknown names raise ``KeyError``
    listing what is available.
    """
    named = OrderedDict(model.named_parameters())
    if isinstance(params, str):
        raise TypeError(f"params must be a list of parameter names, not a string: write params=[{params!r}]")
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, Mapping):
            params = list(params.keys())
        by_id = {id(p): n for n, p in named.items()}
        chosen = []
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise KeyError(
                        f"{item!r} is not a parameter of {type(model).__name__}; "
                        f"available: {', '.join(named) or '(none)'}"
                    )
                chosen.append(item)
            elif isinstance(item, Tensor) and id(item) in by_id:
                chosen.append(by_id[id(item)])
            else:
                raise KeyError(
                    f"params must hold parameter names or parameters of the model, got {type(item).__name__}"
                )
        order = {n: i for i, n in enumerate(named)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    if not chosen:
        raise ValueError(f"no parameters selected in {type(model).__name__} (none requires grad?)")
    return OrderedDict((n, named[n].detach()) for n in chosen)


def flatten_params(tensors: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict into one vector of length :math:`P = \\sum_p \\text{numel}(p)`."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def param_slices(like: Mapping[str, Tensor]) -> dict[str, slice]:
    """Where each parameter lives in :func:`flatten_params`'s vector (and in :func:`hessian`'s rows)."""
    out, start = OrderedDict(), 0
    for name, t in like.items():
        out[name] = slice(start, start + t.numel())
        start += t.numel()
    return out


def unflatten_params(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten_params`: split ``flat`` (``[P]``) into tensors shaped like ``like``."""
    total = sum(t.numel() for t in like.values())
    if flat.shape != (total,):
        raise ValueError(f"expected a vector of {total} entries, got shape {tuple(flat.shape)}")
    return OrderedDict((n, flat[s].view_as(like[n])) for n, s in param_slices(like).items())


def _detached(tensors: Mapping[str, Tensor]) -> Params:
    """Results carry no autograd graph (unselected parameters may require grad)."""
    return OrderedDict((n, t.detach()) for n, t in tensors.items())


def check_vector(vector: Mapping[str, Tensor], primals: Params) -> Params:
    missing = [n for n in primals if n not in vector]
    extra = [n for n in vector if n not in primals]
    if missing or extra:
        raise KeyError(
            "the vector must have exactly the selected parameters' names; "
            f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
        )
    out = OrderedDict()
    for n, p in primals.items():
        v = vector[n]
        if v.shape != p.shape:
            raise ValueError(f"vector[{n!r}] has shape {tuple(v.shape)}, parameter has {tuple(p.shape)}")
        out[n] = v.to(dtype=p.dtype, device=p.device)
    return out


# --------------------------------------------------------------------------------------------------
# The context every curvature computation runs in
# --------------------------------------------------------------------------------------------------
def _hardsigmoid(x: Tensor) -> Tensor:
    """``F.hardsigmoid(x)`` with second derivatives: the same values, as a composition of ops that have them."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = F.hardtanh((x.float() if low else x) + 3.0, 0.0, 6.0) / 6.0
    return y.to(x.dtype) if low else y


class _TwiceDifferentiable(TorchFunctionMode):
    """Computes the functions PyTorch cannot differentiate twice as compositions with the same values (module
    docstring); every other call passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            x, inplace = args[0], kwargs.get("inplace", args[1] if len(args) > 1 else False)
            y = _hardsigmoid(x)
            return x.copy_(y) if inplace else y
        return func(*args, **kwargs)


@contextlib.contextmanager
def curvature_context(model: nn.Module) -> Iterator[None]:
    """Make ``model`` safe for ``torch.func`` second derivatives, and restore it afterwards.

    Inside: grad mode on, the math SDPA backend and no fused ``nn.MultiheadAttention`` fast path
    (neither has forward-mode derivatives); ``hardsigmoid`` computed by ops with second derivatives (same
    values); train-mode BatchNorm uses batch statistics without updating its running statistics; full backward
    hooks are detached; modules that cache a tensor computed from their parameters in eval mode (timm's LeViT and
    EfficientFormer attention: ``attention_bias_cache``) run in train mode, where they compute it afresh from the
    parameters being differentiated (same values). See the module docstring for why.
    """
    caching = [
        m for m in model.modules() if isinstance(getattr(m, "attention_bias_cache", None), dict) and not m.training
    ]
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    hooked = [m for m in model.modules() if m._backward_hooks or m._backward_pre_hooks]
    saved_hooks = [(m, m._backward_hooks, m._backward_pre_hooks, m._is_full_backward_hook) for m in hooked]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no forward-mode AD
        for m in norms:
            m.track_running_stats = False  # train mode + no tracking: batch stats, buffers untouched
        for m in hooked:
            m._backward_hooks, m._backward_pre_hooks = OrderedDict(), OrderedDict()
            m._is_full_backward_hook = None
        for m in caching:
            m.training = True  # not .train(): that would also clear the cache, which eval mode then refills
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), _TwiceDifferentiable():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in norms:
            m.track_running_stats = True
        for m in caching:
            m.training = False
        for m, hooks, pre_hooks, full in saved_hooks:
            m._backward_hooks, m._backward_pre_hooks, m._is_full_backward_hook = hooks, pre_hooks, full


def loss_function(model: nn.Module, loss_fn: LossFn, batch: Batch) -> Callable[[Params], Tensor]:
    """The pure function :math:`\\theta \\mapsto L(\\theta)` on ``batch`` (parameters not in the dict
    are taken from ``model``). Call it inside :func:`curvature_context` for second derivatives."""
    args, targets = split_batch(batch)

    def f(p: Params) -> Tensor:
        return loss_fn(functional_call(model, p, args), targets)

    return f


# --------------------------------------------------------------------------------------------------
# First and second derivatives
# --------------------------------------------------------------------------------------------------
def gradient(model: nn.Module, loss_fn: LossFn, batch: Batch, params=None) -> Params:
    """:math:`\\nabla_\\theta L` as a dict; leaves ``.grad`` and BatchNorm running statistics alone."""
    primals = select_params(model, params)
    with curvature_context(model):
        return _detached(grad(loss_function(model, loss_fn, batch))(primals))


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    vector: Mapping[str, Tensor],
    params=None,
    *,
    method: str = "fwd_rev",
) -> Params:
    r"""Exact Hessian-vector product :math:`H v` of the mean mini-batch loss.

    :math:`Hv = \frac{d}{dt} \nabla_\theta L(\theta + t v)\big|_{t=0}`, computed with

    * ``method="fwd_rev"`` (default): forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``;
    * ``method="rev_rev"``: reverse-over-reverse, ``torch.autograd.grad`` of
      :math:`\langle \nabla_\theta L, v\rangle` (double backward; often faster on CPU). Train-mode
      BatchNorm runs as :class:`oba.standardization.BatchNormTrain` here: the same values and gradient, and a
      closed-form second derivative (PyTorch's generic one cost about a third of the whole HVP on a ResNet).

    Both are verified against finite differences, also for LayerNorm and train-mode BatchNorm.
    ``vector`` maps each selected parameter name to a tensor of its shape.
    Returns a dict name -> tensor shaped like the parameter.
    """
    primals = select_params(model, params)
    tangents = check_vector(vector, primals)
    f = loss_function(model, loss_fn, batch)
    with curvature_context(model):
        if method == "fwd_rev":
            _, out = jvp(grad(f), (primals,), (tangents,))
            return _detached(out)
        if method != "rev_rev":
            raise ValueError(f"method must be 'fwd_rev' or 'rev_rev', got {method!r}")
        leaves = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in primals.items())
        with closed_form_batch_norm():  # PyTorch's generic BatchNorm double backward is slow
            grads = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
        hv = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=list(tangents.values()))
        return OrderedDict((n, h.detach()) for n, h in zip(leaves, hv, strict=True))


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params=None,
    *,
    max_params: int = DEFAULT_MAX_HESSIAN_PARAMS,
    force: bool = False,
    method: str = "vmap",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Dense Hessian :math:`H \in \mathbb{R}^{P\times P}` of the mean mini-batch loss (small models).

    Rows and columns follow :func:`flatten_params` order (see :func:`param_slices`).

    ``method="vmap"`` (default): :math:`H = [\,e_i^\top H\,]_i` as ``vmap`` over the pullback of
    :math:`\nabla L` (reverse-over-reverse; ``chunk_size`` rows at a time bounds memory).
    ``method="loop"``: one :func:`hvp` per basis vector (slow, least memory).
    Both are verified against finite differences, unlike ``torch.func.hessian``, which is wrong for
    LayerNorm and train-mode BatchNorm. The result is not symmetrised (its asymmetry is round-off).

    Raises ``ValueError`` when P exceeds ``max_params`` unless ``force=True``.
    """
    primals = select_params(model, params)
    size = sum(p.numel() for p in primals.values())
    if size > max_params and not force:
        any_p = next(iter(primals.values()))
        gbytes = size * size * any_p.element_size() / 1e9
        raise ValueError(
            f"the dense Hessian of {size:,} parameters would need {gbytes:.2f} GB; "
            f"this exceeds max_params={max_params:,}. Use oba.hvp for products with H, select fewer "
            "parameters with params=..., or pass force=True (or a larger max_params) to build it anyway."
        )
    if method == "loop":
        rows = []
        eye = torch.eye(size, dtype=next(iter(primals.values())).dtype)
        for i in range(size):
            hv = hvp(model, loss_fn, batch, unflatten_params(eye[i], primals), params=list(primals))
            rows.append(flatten_params(hv))
        return torch.stack(rows)
    if method != "vmap":
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")

    f = loss_function(model, loss_fn, batch)
    flat = flatten_params(primals)

    def flat_grad(theta: Tensor) -> Tensor:
        return flatten_params(grad(f)(unflatten_params(theta, primals)))

    with curvature_context(model):
        _, pullback = vjp(flat_grad, flat)
        eye = torch.eye(size, dtype=flat.dtype, device=flat.device)
        return vmap(lambda e: pullback(e)[0], chunk_size=chunk_size)(eye).detach()


def ggn_vp(model: nn.Module, loss_fn: LossFn, batch: Batch, vector: Mapping[str, Tensor], params=None) -> Params:
    r"""Generalised Gauss-Newton-vector product :math:`G v = J^\top \big(\nabla^2_z L\big) J v`.

    :math:`z = f_\theta(X)` is the model output for the whole batch (shape ``[N, C]``) and
    :math:`J = \partial z / \partial \theta`. Computed as one JVP (:math:`Jv`), one Hessian-vector
    product of the loss in output space, and one VJP. :math:`G` is the first of the four terms of
    the Hessian decomposition (for a convex loss it is positive semi-definite).
    """
    primals = select_params(model, params)
    tangents = check_vector(vector, primals)
    args, targets = split_batch(batch)

    def outputs(p: Params) -> Tensor:
        return functional_call(model, p, args)

    def loss_of_outputs(z: Tensor) -> Tensor:
        return loss_fn(z, targets)

    with curvature_context(model):
        z, jv = jvp(outputs, (primals,), (tangents,))
        _, hjv = jvp(grad(loss_of_outputs), (z.detach(),), (jv,))
        _, pullback = vjp(outputs, primals)
        return _detached(pullback(hjv)[0])


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params=None,
    *,
    chunk_size: int | None = None,
    hint: str = "Call model.eval() first.",
) -> Params:
    r"""Per-sample gradients :math:`g_n = \nabla_\theta \ell(f_\theta(x_n), y_n)`, ``[N, *p.shape]`` each.

    Computed with ``vmap(grad(.))`` over the batch, each sample run as a batch of one through
    ``loss_fn``, so :math:`\frac1N\sum_n g_n = \nabla_\theta L` for a mean-reduced loss.
    Undefined for BatchNorm in training mode (batch statistics couple the samples): that raises.
    ``chunk_size`` samples are processed at a time (memory bound); ``hint`` ends that error (what to change).
    """
    bn_train = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn_train:
        raise ValueError(
            "per-sample gradients are undefined with BatchNorm in training mode (batch statistics couple "
            f"the samples): {', '.join(bn_train)}. {hint}"
        )
    primals = select_params(model, params)
    args, targets = split_batch(batch)

    def sample_loss(p: Params, sample_args: tuple[Tensor, ...], target: Tensor) -> Tensor:
        out = functional_call(model, p, tuple(a.unsqueeze(0) for a in sample_args))
        return loss_fn(out, target.unsqueeze(0))

    with curvature_context(model):
        return _detached(vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(primals, args, targets))


def empirical_fisher_vp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    vector: Mapping[str, Tensor],
    params=None,
    *,
    chunk_size: int | None = None,
) -> Params:
    r"""Empirical-Fisher-vector product :math:`F v = \frac1N \sum_n g_n\,(g_n^\top v)`.

    :math:`g_n` are the :func:`per_sample_gradients`; in matrix form :math:`F = \mathcal{G}^\top
    \mathcal{G}/N` with :math:`\mathcal{G} \in \mathbb{R}^{N\times P}` (materialised, so N x P must fit).
    """
    tangents = check_vector(vector, select_params(model, params))
    grads = per_sample_gradients(model, loss_fn, batch, list(tangents), chunk_size=chunk_size)
    n = next(iter(grads.values())).shape[0]
    gmat = torch.cat([g.reshape(n, -1) for g in grads.values()], dim=1)  # [N, P]
    return unflatten_params(gmat.T @ (gmat @ flatten_params(tangents)) / n, tangents)


def finite_difference_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    vector: Mapping[str, Tensor],
    params=None,
    *,
    eps: float = 1e-5,
) -> Params:
    r"""Central finite difference of the gradient, :math:`(g(\theta+\epsilon v) - g(\theta-\epsilon v))/2\epsilon`.

    An oracle for :func:`hvp` that uses first derivatives only (which PyTorch gets right for every
    op), error :math:`O(\epsilon^2)` plus round-off :math:`O(\text{macheps}/\epsilon)`: in float64 with
    ``eps=1e-5`` expect about 1e-8 relative agreement. Not for float32. Assumes the loss is smooth
    within :math:`\epsilon` (no ReLU/max-pool kink crossed, which random inputs make unlikely).
    """
    primals = select_params(model, params)
    tangents = check_vector(vector, primals)
    f = loss_function(model, loss_fn, batch)
    with curvature_context(model):
        plus = grad(f)(OrderedDict((n, p + eps * tangents[n]) for n, p in primals.items()))
        minus = grad(f)(OrderedDict((n, p - eps * tangents[n]) for n, p in primals.items()))
    return OrderedDict((n, ((plus[n] - minus[n]) / (2 * eps)).detach()) for n in primals)


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params=None,
    *,
    method: str = "auto",
    samples: int = 16,
    max_exact: int = 2_000,
    generator: torch.Generator | None = None,
) -> Params:
    r"""Diagonal of the Hessian, :math:`\mathrm{diag}(H)`, shaped like the parameters.

    ``method="exact"``: the diagonal of :func:`hessian` (P rows; small models only).
    ``method="hutchinson"``: :math:`\frac1S \sum_{s=1}^S z_s \odot H z_s` with Rademacher probes
    :math:`z_s \in \{\pm1\}^P` (``samples`` = S HVPs, drawn from ``generator``), an unbiased estimate:
    :math:`\mathbb{E}[z \odot Hz]_i = H_{ii} + \sum_{j\ne i} H_{ij}\,\mathbb{E}[z_i z_j] = H_{ii}`.
    ``method="auto"``: exact when P <= ``max_exact``, else Hutchinson.
    """
    primals = select_params(model, params)
    size = sum(p.numel() for p in primals.values())
    if method == "auto":
        method = "exact" if size <= max_exact else "hutchinson"
    if method == "exact":
        diag = hessian(model, loss_fn, batch, list(primals), max_params=max(max_exact, size)).diagonal()
        return unflatten_params(diag.clone(), primals)
    if method != "hutchinson":
        raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    total = OrderedDict((n, torch.zeros_like(p)) for n, p in primals.items())
    for _ in range(samples):
        z = OrderedDict(
            (n, torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1) for n, p in primals.items()
        )
        hz = hvp(model, loss_fn, batch, z, list(primals))
        for n in total:
            total[n] += z[n] * hz[n]
    return OrderedDict((n, t / samples) for n, t in total.items())
