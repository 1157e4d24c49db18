r"""The layer-wise decomposition of the Hessian into four terms, each applied to a vector.

For a loss :math:`\ell(z)` of the model output :math:`z = f_\theta(X)` computed by a graph of ops
:math:`y_c = \mathrm{op}_c(a_{c,1}, a_{c,2}, \dots)`, the second-order chain rule gives

.. math::
    H = \underbrace{J_z^\top \nabla^2_z\ell\, J_z}_{T_1\ \text{gauss\_newton}}
      + \sum_c \sum_{i,j} J_{a_{c,i}}^\top\, M^{c}_{ij}\, J_{a_{c,j}},
    \qquad M^{c}_{ij} = \frac{\partial^2 \langle G_c, \mathrm{op}_c\rangle}{\partial a_{c,i}\,\partial a_{c,j}},

with :math:`G_c = \partial L / \partial y_c` the output gradient of node :math:`c` and
:math:`J_a = \partial a / \partial \theta` (a parameter is its own operand with :math:`J = I`).
Each op's second derivative :math:`M^c_{ij}` falls into one of three kinds, by its operands:

* ``series`` (:math:`T_2`): a parameter (or parameter-only tensor) times an activation, e.g.
  :math:`Y = XW^\top + b`, a convolution, the affine part of BatchNorm/LayerNorm. Couples :math:`W^{(l)}`
  with every parameter upstream of its input :math:`X^{(l)}`: :math:`\partial^2 Y/\partial W \partial X \ne 0`.
* ``parallel`` (:math:`T_3`): a product of two activations (:math:`QK^\top`, :math:`\mathrm{softmax}(A)V`,
  gating), or of a tensor with itself in two operand slots. Couples the parameters feeding either operand.
* ``nonlinear`` (:math:`T_4`): the curvature of one operand of a non-linear op (:math:`i = j`): GELU/SiLU
  :math:`\sigma''`, softmax, the normalisation of LayerNorm and of train-mode BatchNorm.
  ReLU and max-pooling contribute 0 almost everywhere; linear ops (views, sums, pooling) nothing.

:math:`T_1+T_2+T_3+T_4 = H` exactly. Consequences: under :math:`T_2+T_3`, the block
:math:`H_{W^{(l)}W^{(k)}}` is non-zero only if :math:`k` is upstream of :math:`l` (series) or both feed opposite
operands of a later product (parallel); a layer's diagonal block comes from :math:`T_1` and :math:`T_4` only.

Computation of :math:`T_k v` (:func:`decomposed_hvp`), the efficient way: the model is traced once to its
ATen graph (``make_fx``); one forward pass caches every node's value :math:`a` and, forward-mode, its tangent
:math:`da = J_a v` (propagated op by op); one backward pass caches every output gradient :math:`G_c` (and
each op's pullback). Each op then emits second-order *sources* on its operands,
:math:`s_{c,i} = \sum_j M^c_{ij}\, da_{c,j}` (an op-level ``jvp`` of the op's ``vjp`` at fixed :math:`G_c`:
the product rule with the tangents, e.g. :math:`G_S\,dK` for :math:`S = QK^\top`, and for softmax its
Jacobian :math:`\mathrm{diag}(s) - ss^\top` applied row by row; no :math:`n^3` tensor is formed). Hot ops have
closed forms instead of the generic op-level transforms: convolutions use the fused backward kernel for their
sources and pullbacks (computing only the operand gradients needed; the first backward skips the parameters'),
train-mode BatchNorm and LayerNorm the formulas of :mod:`oba.standardization` for their sources (BatchNorm also
for its tangent, and its fused backward kernel for its pullback). Sources on
parameters are the *downward* part; sources on activations are pulled back to the parameters by ONE
first-order backward pass per term (the *upward* part), re-using the cached pullbacks. :math:`T_1 v` is the
backward pass seeded with :math:`\nabla^2_z\ell\,(J_z v)`. Parameters that enter an op together with
nothing downstream of the data (e.g. ``weight_orig * weight_mask``) are ``series`` if paired with data and
``parallel`` if paired with each other.

Runs inside :func:`oba.curvature.curvature_context` (train-mode BatchNorm uses batch statistics without
touching its running statistics, no hooks are attached, the math attention kernel).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, grad, jvp, vjp
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from oba.curvature import Batch, LossFn, Params, check_vector, curvature_context, select_params, split_batch
from oba.standardization import batch_norm_layout, project, standardization_hvp

__all__ = ["TERMS", "HessianDecomposition", "decomposed_hvp", "term_hvp", "hessian_block_structure"]

TERMS: tuple[str, ...] = ("gauss_newton", "series", "parallel", "nonlinear")

aten = torch.ops.aten
#: ops whose second derivative vanishes in every pair of operands: no sources to compute
_LINEAR_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.clone.default,
    aten.alias.default,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.neg.default,
    aten.cat.default,
    aten.stack.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.mean.dim,
    aten.mean.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.constant_pad_nd.default,
}


#: ops with zero second derivative almost everywhere (piecewise linear)
_PIECEWISE_LINEAR_OPS = {aten.relu.default, aten.max_pool2d_with_indices.default}
#: bilinear ops -> the positions of their two operands: the mixed derivative applied to a tangent is the
#: op's pullback evaluated with the other operand replaced by its tangent (e.g. conv input-grad of (G, dW))
_BILINEAR_OPS = {
    aten.convolution.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.mul.Tensor: (0, 1),
}


#: normalisations y = weight * normalise(x) + bias -> (argument index of weight, of bias): linear in the
#: bias (no second derivative), and in the weight, whose mixed derivative with x applied to d(weight) is the
#: op's pullback w.r.t. x with weight replaced by d(weight)
_AFFINE_NORM_OPS = {
    aten.native_batch_norm.default: (1, 2),
    aten.native_layer_norm.default: (2, 3),
}


def _differentiable_outputs(out: Any) -> Any:
    """An op's output without its non-floating-point parts (e.g. max-pool indices)."""
    if isinstance(out, (tuple, list)):
        return tuple(o for o in out if isinstance(o, Tensor) and o.is_floating_point())
    return out


def _conv_backward(op: _Op, env: Mapping[fx.Node, Any], g: Tensor, x: Tensor, w: Tensor, mask: Sequence[bool]) -> Any:
    """``aten.convolution_backward`` of ``op`` (a convolution) at input ``x`` and weight ``w``: the input,
    weight and bias gradients selected by ``mask`` for output gradient ``g`` (the others are ``None``)."""
    args = [env[a] if isinstance(a, fx.Node) else a for a in op.node.args]
    bias = args[2]
    return aten.convolution_backward(g, x, w, None if bias is None else list(bias.shape), *args[3:], list(mask))


def _first_three_operands(op: _Op, need: Sequence[bool]) -> tuple[dict[int, int], list[bool]] | None:
    """For an op whose tangent-carrying operands are among its first three arguments (input, weight, bias):
    ``{slot leaf: argument index}`` and the ``output_mask`` of its fused backward kernel; ``None`` otherwise."""
    position = {op.leaf_of_arg(i): i for i in range(3)}
    if any(k not in position for k in op.slots):
        return None
    mask = [False] * 3
    for k, wanted in zip(op.slots, need, strict=True):
        mask[position[k]] = wanted
    return position, mask


def _conv_pullback(trace: _Trace, op: _Op, cot: Any, need: Sequence[bool]) -> list[Tensor | None] | None:
    r"""VJP of ``convolution(x, W, b)`` computing only the operand gradients in ``need`` (per slot)."""
    position, mask = _first_three_operands(op, need)
    if not any(mask):
        return [None] * len(op.slots)
    x, w = (trace.value[a] if isinstance(a, fx.Node) else a for a in op.node.args[:2])
    grads = _conv_backward(op, trace.value, cot, x, w, mask)
    return [grads[position[k]] if wanted else None for k, wanted in zip(op.slots, need, strict=True)]


def _batch_norm_is_train(op: _Op) -> bool:
    """``native_batch_norm(x, w, b, running_mean, running_var, training, momentum, eps)`` with batch statistics."""
    return op.node.args[5] is True


def _batch_norm_pullback(trace: _Trace, op: _Op, cot: Any, need: Sequence[bool]) -> list[Tensor | None] | None:
    """VJP of train-mode ``native_batch_norm`` by the fused kernel, when only its normalised output has a
    cotangent; ``None`` (use the generic VJP) otherwise."""
    operands = _first_three_operands(op, need)
    if not _batch_norm_is_train(op) or any(c is not None for c in cot[1:]) or cot[0] is None or operands is None:
        return None
    position, mask = operands
    x, w, _, rm, rv, _, _, eps = (trace.value[a] if isinstance(a, fx.Node) else a for a in op.node.args)
    _, mean, inv_std = trace.value[op.node]
    grads = aten.native_batch_norm_backward(cot[0], x, w, rm, rv, mean, inv_std, True, eps, mask)
    return [grads[position[k]] if wanted else None for k, wanted in zip(op.slots, need, strict=True)]


#: ops with a direct VJP (fused kernels, only the needed operand gradients) instead of ``torch.func.vjp``
_FAST_PULLBACKS = {aten.convolution.default: _conv_pullback, aten.native_batch_norm.default: _batch_norm_pullback}


def _batch_norm_jvp(trace: _Trace, op: _Op) -> tuple[Any, Any] | None:
    r"""Value and tangent of train-mode ``native_batch_norm`` -> ``(y, mean, inv_std)`` in closed form:
    :math:`\mathrm{d}y = \gamma r P\mathrm{d}x + \mathrm{d}\gamma\,\hat x + \mathrm{d}\beta` (shape of x),
    :math:`\mathrm{d}\mu = \langle\mathrm{d}x\rangle`, :math:`\mathrm{d}r = -r^2\langle\hat x\,\mathrm{d}x\rangle`
    (``[C]``), with :math:`r = \sigma^{-1}` and :math:`P` of :mod:`oba.standardization`. ``None`` (use the generic
    JVP) for eval mode or tangents on other arguments."""
    operands = _first_three_operands(op, [True] * len(op.slots))
    if not _batch_norm_is_train(op) or operands is None:
        return None
    position = operands[0]
    value = op.call([trace.value[op.leaves[k]] for k in op.slots], trace.value)
    x, w = (trace.value[a] if isinstance(a, fx.Node) else a for a in op.node.args[:2])
    y, mean, inv_std = value
    dims, channel = batch_norm_layout(x)
    r = inv_std.view(channel)
    xhat = (x - mean.view(channel)) * r
    d = {position[k]: trace.tangent[op.leaves[k]] for k in op.slots}
    dy, d_mean, d_inv_std = torch.zeros_like(y), torch.zeros_like(mean), torch.zeros_like(inv_std)
    if 0 in d:
        gamma_r = r if w is None else w.view(channel) * r
        dy = dy + gamma_r * project(d[0], xhat, dims)
        d_mean = d[0].mean(dim=dims)
        d_inv_std = -inv_std * inv_std * (xhat * d[0]).mean(dim=dims)
    if 1 in d:
        dy = dy + d[1].view(channel) * xhat
    if 2 in d:
        dy = dy + d[2].view(channel)
    return value, (dy, d_mean, d_inv_std)


#: ops with a closed-form JVP instead of ``torch.func.jvp``
_FAST_JVPS = {aten.native_batch_norm.default: _batch_norm_jvp}


@dataclass
class _Standardization:
    r"""Where a train-mode BatchNorm or a LayerNorm node standardises (see :mod:`oba.standardization`).

    ``xhat`` (shape of x), ``inv_std`` (:math:`\sigma^{-1}`, broadcastable to x), ``dims`` (the reduced
    dims), ``weight_view`` (the shape that makes a weight-shaped tensor broadcast against x: ``[1, C, 1, 1]``
    for BatchNorm2d), ``gamma`` (the weight so viewed, or ``None``), ``weight_dims`` (the dims of x a
    weight gradient sums over).
    """

    xhat: Tensor
    inv_std: Tensor
    dims: list[int]
    weight_view: list[int]
    gamma: Tensor | None
    weight_dims: list[int]


def _standardization(trace: _Trace, op: _Op) -> _Standardization | None:
    """The standardisation of a train-mode ``native_batch_norm`` or a ``native_layer_norm`` node, else ``None``."""
    node = op.node
    x = trace.value[node.args[0]]
    _, mean, inv_std = trace.value[node]
    if node.target is aten.native_batch_norm.default and _batch_norm_is_train(op) and x.dim() > 1:
        dims, channel = batch_norm_layout(x)
        mean, inv_std = mean.view(channel), inv_std.view(channel)
        weight = trace.value[node.args[1]] if isinstance(node.args[1], fx.Node) else None
        gamma = None if weight is None else weight.view(channel)
        return _Standardization((x - mean) * inv_std, inv_std, dims, channel, gamma, dims)
    if node.target is aten.native_layer_norm.default:
        dims = list(range(x.dim() - len(node.args[1]), x.dim()))
        weight = trace.value[node.args[2]] if isinstance(node.args[2], fx.Node) else None
        view = list(x.shape[dims[0] :])
        return _Standardization((x - mean) * inv_std, inv_std, dims, view, weight, list(range(dims[0])))
    return None


@dataclass
class _Op:
    """One traced op: the call, which of its (flattened) operands carry a tangent, and their kinds."""

    node: fx.Node
    leaves: list[Any]  # flattened (args, kwargs); fx.Node leaves are operands
    spec: Any
    slots: list[int]  # positions in `leaves` of operands with a tangent (they depend on the parameters)

    def call(self, values: Sequence[Tensor], env: Mapping[fx.Node, Any]) -> Any:
        """Evaluate with the tangent-carrying operands replaced by ``values``."""
        leaves = [env[x] if isinstance(x, fx.Node) else x for x in self.leaves]
        for k, v in zip(self.slots, values, strict=True):
            leaves[k] = v
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.node.target(*args, **kwargs)

    def leaf_of_arg(self, index: int) -> int:
        """Position in :attr:`leaves` of positional argument ``index`` (a tensor argument)."""
        return sum(len(tree_flatten(a)[0]) for a in self.node.args[:index])

    def pullback_at(self, env: Mapping[fx.Node, Any], wrt: int, replace: int, by: Tensor, cot: Any) -> Tensor:
        """VJP w.r.t. leaf ``wrt`` of the op with leaf ``replace`` set to ``by``, applied to ``cot``
        (structured as :meth:`call_differentiable`'s output)."""
        leaves = [env[x] if isinstance(x, fx.Node) else x for x in self.leaves]
        leaves[replace] = by

        def f(x: Tensor) -> Any:
            ls = list(leaves)
            ls[wrt] = x
            args, kwargs = tree_unflatten(ls, self.spec)
            return _differentiable_outputs(self.node.target(*args, **kwargs))

        return vjp(f, leaves[wrt])[1](cot)[0]

    def call_differentiable(self, values: Sequence[Tensor], env: Mapping[fx.Node, Any]) -> Any:
        """As :meth:`call`, keeping only floating-point outputs (e.g. drops max-pool indices)."""
        return _differentiable_outputs(self.call(values, env))


class _Trace:
    """Forward values and tangents, output gradients and pullbacks of one model on one batch."""

    def __init__(self, gm: fx.GraphModule, state: Params, tangents: Params, args: tuple[Tensor, ...]):
        """``gm`` traced from ``(state, *args)``; ``tangents`` holds the selected parameters' directions."""
        self.gm = gm
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        names = list(state) + [None] * len(args)
        self.param_nodes = OrderedDict((n, node) for n, node in zip(names, placeholders, strict=True) if n in tangents)
        self.param_leaves = set(self.param_nodes.values())
        self.value: dict[fx.Node, Any] = {}
        self.tangent: dict[fx.Node, Any] = {}
        self.kind: dict[fx.Node, str] = {}  # "param": depends on parameters only; "data": on the inputs too
        self.ops: dict[fx.Node, _Op] = {}
        for node, name, value in zip(placeholders, names, list(state.values()) + list(args), strict=True):
            self.value[node] = value
            self.tangent[node] = tangents.get(name)
            self.kind[node] = "data" if name is None else ("param" if name in tangents else "const")
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                self.value[node], self.tangent[node], self.kind[node] = getattr(self.gm, node.target), None, "const"
            elif node.op == "call_function":
                self._forward(node)
            elif node.op == "output":
                out = node.args[0]
                out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
                if not isinstance(out, fx.Node) or not isinstance(self.value[out], Tensor):
                    raise TypeError("the model must return a single tensor (the logits) for the decomposition")
                self.output = out

    def _forward(self, node: fx.Node) -> None:
        if node.target is operator.getitem:
            src, idx = node.args
            self.value[node] = self.value[src][idx]
            tan = self.tangent[src]
            self.tangent[node] = None if tan is None else tan[idx]
            self.kind[node] = self.kind[src]
            return
        leaves, spec = tree_flatten((node.args, node.kwargs))
        operands = [x for x in leaves if isinstance(x, fx.Node)]
        kinds = {self.kind[x] for x in operands}
        self.kind[node] = "data" if "data" in kinds else ("param" if "param" in kinds else "const")
        slots = [k for k, x in enumerate(leaves) if isinstance(x, fx.Node) and self.tangent[x] is not None]
        op = _Op(node, leaves, spec, slots)
        if not slots:
            self.value[node] = op.call([], self.value)
            self.tangent[node] = None
            return
        self.ops[node] = op
        fast = _FAST_JVPS.get(node.target)
        value_and_tangent = None if fast is None else fast(self, op)
        if value_and_tangent is None:
            primal = tuple(self.value[leaves[k]] for k in slots)
            tangent = tuple(self.tangent[leaves[k]] for k in slots)
            value_and_tangent = jvp(lambda *xs: op.call(xs, self.value), primal, tangent)
        value, tan = value_and_tangent
        self.value[node] = value
        if isinstance(value, (tuple, list)):
            self.tangent[node] = tuple(t if v.is_floating_point() else None for v, t in zip(value, tan, strict=True))
        else:
            self.tangent[node] = tan

    def pullback(self, node: fx.Node, cot: Any, need: Sequence[bool]) -> Sequence[Tensor | None]:
        """The op's VJP of ``cot`` w.r.t. its tangent-carrying operands (``None`` where not ``need``-ed).

        Convolutions and train-mode BatchNorm use their fused backward kernels and compute only the
        needed gradients; other ops a ``torch.func.vjp`` closure, built once and cached.
        """
        op = self.ops[node]
        fast = _FAST_PULLBACKS.get(node.target)
        grads = None if fast is None else fast(self, op, cot, need)
        if grads is not None:
            return grads
        if not hasattr(op, "vjp_fn"):
            primal = tuple(self.value[op.leaves[k]] for k in op.slots)
            _, op.vjp_fn = vjp(lambda *xs: op.call_differentiable(xs, self.value), *primal)
        return op.vjp_fn(self._cotangent_struct(node, cot))

    def _cotangent_struct(self, node: fx.Node, cot: Any) -> Any:
        """The cotangent in the shape :meth:`_Op.call_differentiable` returns (zeros where none arrived)."""
        value = self.value[node]
        if not isinstance(value, (tuple, list)):
            return cot
        return tuple(
            c if c is not None else torch.zeros_like(v)
            for v, c in zip(value, cot, strict=True)
            if isinstance(v, Tensor) and v.is_floating_point()
        )

    def backward(self, *seeds: Mapping[fx.Node, Tensor], to_params: bool = True) -> dict[fx.Node, Any]:
        """Pull the cotangents of the ``seeds`` maps (placed on any nodes; several maps are summed, the sweep
        being linear) back through the graph with first-order VJPs.

        ``to_params=True``: returns the cotangents of the parameter nodes; every other node's cotangent is freed
        as soon as it has been pulled back (the sweep then holds about one layer's worth of them, as autograd).
        ``to_params=False``: returns the accumulated cotangent of every node reached (tuples for multi-output
        ops), without computing the gradients of the parameters themselves (only activations' are wanted).
        """
        cot: dict[fx.Node, Any] = {}

        def add(node: fx.Node, value: Tensor, index: int | None = None) -> None:
            if index is None:
                cot[node] = value if node not in cot else cot[node] + value
            else:
                parts = list(cot.get(node, (None,) * len(self.value[node])))
                parts[index] = value if parts[index] is None else parts[index] + value
                cot[node] = tuple(parts)

        for seed in seeds:
            for node, value in seed.items():
                add(node, value)
        for node in reversed(list(self.gm.graph.nodes)):
            if node not in cot or node.op != "call_function":
                continue
            if node.target is operator.getitem:
                src, idx = node.args
                if self.tangent[src] is not None:
                    add(src, cot[node], idx)
            elif node in self.ops:
                leaves = [self.ops[node].leaves[k] for k in self.ops[node].slots]
                need = [to_params or leaf not in self.param_leaves for leaf in leaves]
                for leaf, g in zip(leaves, self.pullback(node, cot[node], need), strict=True):
                    if g is not None:
                        add(leaf, g)
            if to_params:
                del cot[node]  # pulled back: only the parameters' cotangents are returned
        return cot

    def _term(self, node_i: fx.Node, node_j: fx.Node, same_slot: bool) -> str:
        """The term a second derivative between operands ``node_i`` and ``node_j`` of one op belongs to."""
        if same_slot:
            return "nonlinear"
        if {self.kind[node_i], self.kind[node_j]} == {"param", "data"}:
            return "series"
        return "parallel"

    def sources(
        self, gradients: Mapping[fx.Node, Any], terms: Sequence[str] = TERMS
    ) -> dict[str, dict[fx.Node, Tensor]]:
        r"""Second-order sources :math:`s_{c,i} = \sum_j M^c_{ij} da_{c,j}` of every op, split by term.

        Closed-form sources of a term not in ``terms`` are not computed (its entry may stay incomplete).
        """
        out: dict[str, dict[fx.Node, Tensor]] = {"series": {}, "parallel": {}, "nonlinear": {}}

        def add(term: str, node: fx.Node, value: Tensor) -> None:
            out[term][node] = value if node not in out[term] else out[term][node] + value

        for node, op in self.ops.items():
            if node.target in _LINEAR_OPS or node.target in _PIECEWISE_LINEAR_OPS or node not in gradients:
                continue
            g = self._cotangent_struct(node, gradients[node])
            if node.target is aten.convolution.default:
                self._conv_sources(op, g, add)
                continue
            std = _standardization(self, op) if node.target in _AFFINE_NORM_OPS else None
            if std is not None and all(c is None for c in gradients[node][1:]):
                self._standardization_sources(op, std, g[0], add, nonlinear="nonlinear" in terms)
                continue
            if node.target in _BILINEAR_OPS:
                p, q = _BILINEAR_OPS[node.target]
                if p in op.slots and q in op.slots:  # both operands depend on the parameters
                    node_p, node_q = op.leaves[p], op.leaves[q]
                    term = self._term(node_p, node_q, same_slot=False)
                    add(term, node_p, op.pullback_at(self.value, p, q, self.tangent[node_q], g))
                    add(term, node_q, op.pullback_at(self.value, q, p, self.tangent[node_p], g))
                continue
            skip: set[int] = set()  # slots whose tangent emits no source through the generic path
            if node.target in _AFFINE_NORM_OPS:
                weight, bias = (op.leaf_of_arg(a) for a in _AFFINE_NORM_OPS[node.target])
                skip = {weight, bias}
                if weight in op.slots:
                    d_w = self.tangent[op.leaves[weight]]
                    for k in op.slots:
                        if k not in skip:
                            value = op.pullback_at(self.value, k, weight, d_w, g)
                            add(self._term(op.leaves[k], op.leaves[weight], same_slot=False), op.leaves[k], value)
            primal = [self.value[op.leaves[k]] for k in op.slots]

            def op_vjp(*xs: Tensor, op: _Op = op, g: Any = g) -> tuple[Tensor, ...]:
                return vjp(lambda *ys: op.call_differentiable(ys, self.value), *xs)[1](g)

            for j, slot_j in enumerate(op.slots):
                if slot_j in skip:
                    continue

                def vary_j(x_j: Tensor, j: int = j, primal: list[Tensor] = primal) -> tuple[Tensor, ...]:
                    xs = list(primal)
                    xs[j] = x_j
                    return op_vjp(*xs)

                _, src = jvp(vary_j, (primal[j],), (self.tangent[op.leaves[slot_j]],))
                for i, slot_i in enumerate(op.slots):
                    node_i = op.leaves[slot_i]
                    add(self._term(node_i, op.leaves[slot_j], same_slot=i == j), node_i, src[i])
        return out

    def _conv_sources(self, op: _Op, g: Tensor, add: Callable[[str, fx.Node, Tensor], None]) -> None:
        r"""Sources of :math:`Y = \mathrm{conv}(X, W) + b`, bilinear in :math:`(X, W)`, for output gradient
        :math:`G` ``[N, C_out, H', W']``: on :math:`X` the input-gradient of :math:`(G, \mathrm{d}W)`, on
        :math:`W` the weight-gradient of :math:`(G, \mathrm{d}X)` (one fused backward kernel each)."""
        x_slot, w_slot = op.leaf_of_arg(0), op.leaf_of_arg(1)
        if x_slot not in op.slots or w_slot not in op.slots:
            return
        x_node, w_node = op.leaves[x_slot], op.leaves[w_slot]
        x, w = self.value[x_node], self.value[w_node]
        term = self._term(x_node, w_node, same_slot=False)
        add(term, x_node, _conv_backward(op, self.value, g, x, self.tangent[w_node], [True, False, False])[0])
        add(term, w_node, _conv_backward(op, self.value, g, self.tangent[x_node], w, [False, True, False])[1])

    def _standardization_sources(
        self,
        op: _Op,
        std: _Standardization,
        g: Tensor,
        add: Callable[[str, fx.Node, Tensor], None],
        *,
        nonlinear: bool = True,
    ) -> None:
        r"""Closed-form sources of :math:`y = \gamma\odot\hat x(x) + \beta` (train-mode BatchNorm, LayerNorm)
        for output gradient :math:`G` (shape of x), :math:`\tilde G = \gamma\odot G`; see :mod:`oba.standardization`:

        * nonlinear, on x: :math:`\partial^2_{xx}\langle\tilde G,\hat x\rangle\,\mathrm{d}x
          = -\sigma^{-2}[\langle\mathrm{d}x\,P\tilde G\rangle\hat x + \langle\tilde G\hat x\rangle P\mathrm{d}x
          + \langle\mathrm{d}x\,\hat x\rangle P\tilde G]` (shape of x);
        * x with :math:`\gamma` (series or parallel): on x :math:`\sigma^{-1}P(\mathrm{d}\gamma\odot G)`,
          on :math:`\gamma` :math:`\sum G\odot\sigma^{-1}P\mathrm{d}x` over the dims :math:`\gamma` is broadcast
          along (shape of :math:`\gamma`). :math:`y` is linear in :math:`\gamma` and :math:`\beta` otherwise.

        ``nonlinear=False`` skips the first (the most expensive) when that term is not wanted.
        """
        x_slot = op.leaf_of_arg(0)
        if x_slot not in op.slots:
            return
        x_node = op.leaves[x_slot]
        dx = self.tangent[x_node]
        p_dx = project(dx, std.xhat, std.dims)
        if nonlinear:
            g_hat = g if std.gamma is None else std.gamma * g
            add("nonlinear", x_node, standardization_hvp(g_hat, std.xhat, std.inv_std, dx, std.dims, p_dx=p_dx))
        w_slot = op.leaf_of_arg(_AFFINE_NORM_OPS[op.node.target][0])
        if w_slot in op.slots:
            w_node = op.leaves[w_slot]
            d_gamma = self.tangent[w_node].view(std.weight_view)
            term = self._term(x_node, w_node, same_slot=False)
            add(term, x_node, std.inv_std * project(d_gamma * g, std.xhat, std.dims))
            add(term, w_node, (g * std.inv_std * p_dx).sum(dim=std.weight_dims))


class HessianDecomposition:
    """The four-term decomposition of one model's Hessian, re-usable across batches and vectors.

    The model is traced once per input signature (parameter and input shapes and dtypes, train/eval modes)
    with all its parameters and buffers as graph inputs, so the trace stays valid when their values change
    (training, BatchNorm statistics); build a new object after changing the model in other ways.

    >>> dec = HessianDecomposition(model, F.cross_entropy)
    >>> parts = dec(batch, vector)          # {term: {param name: (T_term v)}}
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, params=None):
        self.model, self.loss_fn = model, loss_fn
        self.param_names = list(select_params(model, params))
        self._graphs: dict[tuple, fx.GraphModule] = {}

    def _state(self) -> Params:
        """Selected parameters first, then every other parameter and buffer (detached)."""
        state = select_params(self.model, self.param_names)
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            state.setdefault(name, t.detach())
        return state

    def _graph(self, state: Params, args: tuple[Tensor, ...]) -> fx.GraphModule:
        key = (
            tuple((n, tuple(t.shape), t.dtype) for n, t in state.items()),
            tuple((tuple(a.shape), a.dtype) for a in args),
            tuple(m.training for m in self.model.modules()),
        )
        if key not in self._graphs:
            model = self.model
            self._graphs[key] = make_fx(lambda s, *a: functional_call(model, s, a))(state, *args)
        return self._graphs[key]

    def __call__(self, batch: Batch, vector: Mapping[str, Tensor], terms: Sequence[str] = TERMS) -> dict[str, Params]:
        r"""Each term times ``vector``: ``{term: {param name: (T_term v)_param}}`` for ``terms`` ⊆ :data:`TERMS`."""
        return self._products(batch, vector, {term: (term,) for term in terms})

    def hvp(self, batch: Batch, vector: Mapping[str, Tensor], terms: Sequence[str] = TERMS) -> Params:
        r""":math:`\sum_{k \in \text{terms}} T_k v`, the Hessian restricted to those terms, times ``vector``.

        The backward pass is linear, so the terms' sources are added first and pulled back in ONE sweep
        (not one per term as in :meth:`__call__`).
        """
        return self._products(batch, vector, {"sum": tuple(terms)})["sum"]

    def _products(
        self, batch: Batch, vector: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]]
    ) -> dict[str, Params]:
        """``{key: {param name: (sum of T_term v over the terms of groups[key])_param}}``, one sweep per key."""
        wanted = {t for terms in groups.values() for t in terms}
        unknown = wanted - set(TERMS)
        if unknown:
            raise ValueError(f"unknown term(s) {sorted(unknown)}; choose from {', '.join(TERMS)}")
        state = self._state()
        primals = OrderedDict((n, state[n]) for n in self.param_names)
        tangents = check_vector(vector, primals)
        args, targets = split_batch(batch)

        def loss_of_outputs(z: Tensor) -> Tensor:
            return self.loss_fn(z, targets)

        with curvature_context(self.model):
            trace = _Trace(self._graph(state, args), state, tangents, args)
            z, dz = trace.value[trace.output], trace.tangent[trace.output]
            if dz is None:
                raise ValueError("the model output does not depend on the selected parameters")
            g_z, hdz = jvp(grad(loss_of_outputs), (z.detach(),), (dz,))
            gradients = trace.backward({trace.output: g_z}, to_params=False)
            seeds = trace.sources(gradients, tuple(wanted)) if wanted - {"gauss_newton"} else {}
            seeds["gauss_newton"] = {trace.output: hdz}
            cots = {key: trace.backward(*(seeds[t] for t in terms)) for key, terms in groups.items()}
        return {
            key: OrderedDict(
                (n, cots[key][node].detach() if node in cots[key] else torch.zeros_like(primals[n]))
                for n, node in trace.param_nodes.items()
            )
            for key in groups
        }


def decomposed_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    vector: Mapping[str, Tensor],
    params=None,
    *,
    terms: Sequence[str] = TERMS,
) -> dict[str, Params]:
    r"""Each term of the Hessian decomposition times ``vector``: ``{term: {param name: (T_term v)_param}}``.

    ``terms`` is any subset of :data:`TERMS` = (``"gauss_newton"``, ``"series"``, ``"parallel"``,
    ``"nonlinear"``); the four together sum to :func:`oba.hvp` (see the module docstring for the math).
    The cost is one traced forward with tangents, one backward, the op-level sources and one more backward
    per requested term (none for a term without sources). For many batches, re-use a :class:`HessianDecomposition`.
    """
    return HessianDecomposition(model, loss_fn, params)(batch, vector, terms)


def term_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    vector: Mapping[str, Tensor],
    params=None,
    *,
    terms: Sequence[str] = TERMS,
) -> Params:
    """:math:`\\sum_{k \\in \\text{terms}} T_k v`: the Hessian restricted to a subset of the four terms.

    ``terms=("series", "parallel")`` is what the published OBA code computes; all four give :math:`Hv`.
    The terms' sources are summed before the backward pass: one sweep whatever the number of terms.
    """
    return HessianDecomposition(model, loss_fn, params).hvp(batch, vector, terms)


def hessian_block_structure(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params=None,
    *,
    rtol: float = 1e-8,
    seed: int = 0,
) -> tuple[list[str], dict[str, Tensor]]:
    r"""Which (layer, layer) blocks of each term are non-zero on this model and batch.

    Layers are the modules owning the selected parameters (``"fc1"`` for ``fc1.weight`` and
    ``fc1.bias``). For each layer :math:`l` a random Gaussian vector supported on :math:`l` is applied to
    every term; block :math:`(k, l)` of term :math:`T` is reported non-zero when
    :math:`\|(T v_l)_k\| > \text{rtol} \cdot \max_{k', l'} \|(T' v_{l'})_{k'}\|` over all terms (a non-zero
    block maps a random vector to zero with probability 0).

    Returns ``(layer names, {term: bool tensor [L, L]})``, rows = output layer k, columns = probed layer l.
    """
    primals = select_params(model, params)
    layer_of = {n: n.rpartition(".")[0] for n in primals}
    layers = list(OrderedDict.fromkeys(layer_of.values()))
    gen = torch.Generator().manual_seed(seed)
    decomposition = HessianDecomposition(model, loss_fn, list(primals))
    norms = {t: torch.zeros(len(layers), len(layers), dtype=torch.float64) for t in TERMS}
    for col, layer in enumerate(layers):
        v = OrderedDict(
            (n, torch.randn(p.shape, generator=gen).to(p) if layer_of[n] == layer else torch.zeros_like(p))
            for n, p in primals.items()
        )
        parts = decomposition(batch, v)
        for term, hv in parts.items():
            for n, t in hv.items():
                row = layers.index(layer_of[n])
                norms[term][row, col] = (norms[term][row, col] ** 2 + t.double().pow(2).sum()).sqrt()
    scale = max(float(m.max()) for m in norms.values())
    return layers, {t: m > rtol * scale for t, m in norms.items()}
