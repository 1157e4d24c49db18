"""Channels Torch-Pruning's dependency graph cannot prune as traced, found before anything changes.

Torch-Pruning (1.6) follows a channel through every operation of the traced graph. Four kinds of operations break
the groups it builds, and :func:`prunable_groups` finds the layers they couple, so that the pruner keeps them whole
(they are added to the ignored layers, with a ``UserWarning`` naming them) and prunes the rest of the model:

* a *channel slice* ``x[:, a:b]`` (ReXNet's ``cat([x[:, :C] + shortcut, x[:, C:]])``): its bounds are constants of
  the model's code, which pruning cannot change, and Torch-Pruning's traversal of a chain of them grows
  exponentially (``MetaPruner`` does not finish either). Every layer whose output reaches such a slice through
  channel-preserving operations (normalisation, activations, additions, concatenations, depthwise convs) is kept;
  the search walks the graph itself, without asking Torch-Pruning for the group. A slice over the whole range (a
  no-op, GhostNet's ``out[:, :oup]`` at full width) is harmless and ignored.
* a *channel split* ``x.split(s, dim=1)`` (CSPNet's ``xs, xb = x.split(C // 2, dim=1)``): the split sizes are
  constants of the model's code too (and Torch-Pruning 1.6 infers them from the number of consumers, not of pieces).
* a *reshape, transpose or split of another dimension* it does not model (MLP-Mixer's token-mixing MLP on
  ``x.transpose(1, 2)``; LeViT's and EfficientFormer's ``qkv.view(B, N, heads, -1).split([d, d, dv], dim=3)``): the
  group then maps the root's channels onto indices beyond a member layer's width.
* an operation whose channels Torch-Pruning cannot *map* at all: building the graph fails in its index mapping (the
  pass after the trace that maps channel indices through concatenations, splits and reshapes). ShuffleNet's channel
  shuffle (``x.view(B, g, C // g, H, W).transpose(1, 2).view(B, C, H, W)``) divides by zero there, DPN's and Swin's
  concatenations add up a channel count it could not infer. :func:`build_graph` resumes the mapping around such an
  operation, and an operation it maps without an error but leaves unmapped (a concatenation of an input whose
  channels it cannot count, a reshape whose channel search stops at its recursion limit,
  ``constants.MAX_RECURSION_DEPTH``) counts the same: every layer whose output reaches it through
  channel-preserving operations is kept, as for a channel slice.

A group is kept whole by ignoring every layer it prunes on the output side: Torch-Pruning skips a group with an
ignored output-side member, whichever root it starts from. The trace itself failing (a model whose forward
Torch-Pruning cannot follow) still raises, from :func:`build_graph`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import Node, constants, index_mapping, shape_infer

__all__ = ["build_graph", "prunable_groups"]

_OPTYPE = tp.ops.OPTYPE
# layers whose input and output channels are independent (CUSTOMIZED: Hugging Face Conv1D, oba.hf_layers)
_LAYERS = (_OPTYPE.CONV, _OPTYPE.LINEAR, _OPTYPE.CUSTOMIZED)


def build_graph(
    model: nn.Module, example_inputs: Any, **build_kwargs: Any
) -> tuple[tp.DependencyGraph, dict[Node, str]]:
    """``(dg, unmapped)``: Torch-Pruning's dependency graph of ``model`` traced on ``example_inputs``
    (``build_kwargs``: those of ``DependencyGraph.build_dependency``), and ``{node: why}``, the operations whose
    channels it could not map (module docstring), for :func:`prunable_groups`.

    Where the index mapping raises, the node it was mapping is set aside and the mapping runs again (it is what
    ``dg.get_pruning_group`` runs before every group it builds), until it finishes; the operations it then leaves
    unmapped (:func:`_left_unmapped`) are set aside too, and the mapping runs once more. Setting a node aside types
    it as an element-wise operation in this graph, which Torch-Pruning's mapping passes over (no module constant or
    function of Torch-Pruning changes). Any other failure (the trace) propagates, without the forward hooks the
    trace leaves on the model when its forward raises."""
    hooks = {m: set(m._forward_hooks) for m in model.modules()}
    dg = tp.DependencyGraph()
    unmapped: dict[Node, str] = {}
    run = functools.partial(dg.build_dependency, model, example_inputs=example_inputs, **build_kwargs)
    while True:
        try:
            run()
        except Exception as err:
            node = _mapping_node(err)
            if node is None:  # not in the index mapping: the trace or the graph's construction
                for m, before in hooks.items():
                    for key in set(m._forward_hooks) - before:
                        del m._forward_hooks[key]
                raise
            unmapped[node] = f"{type(err).__name__}: {err}"
        else:
            left = dict(_left_unmapped(dg))
            if not left:
                return dg, unmapped
            unmapped.update(left)
        for node in unmapped:
            node.type = _OPTYPE.ELEMENTWISE
        run = functools.partial(index_mapping.update_index_mapping, dg)


def _mapping_node(err: Exception) -> Node | None:
    """The node Torch-Pruning's ``update_index_mapping`` was mapping when ``err`` was raised, or None (raised
    elsewhere)."""
    node, tb = None, err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is index_mapping.update_index_mapping.__code__:
            node = tb.tb_frame.f_locals.get("node")
        tb = tb.tb_next
    return node


def _left_unmapped(dg: tp.DependencyGraph) -> Iterator[tuple[Node, str]]:
    """The concatenations and reshapes Torch-Pruning's index mapping returned from without a mapping because a
    channel search of theirs stopped at its recursion limit (``constants.MAX_RECURSION_DEPTH``), with why: a
    concatenation with an input it could not count the channels of, a reshape it could not compare the channel
    counts of (``update_reshape_index_mapping``'s checks, in its order; ``_2d_4d`` is the graph's flag for it)."""
    why = f"a channel search stops at Torch-Pruning's recursion limit, {constants.MAX_RECURSION_DEPTH} steps"
    for node in dg.module2node.values():
        if node.type == _OPTYPE.CONCAT:
            sizes = node.module.concat_sizes or ()
            out_of_reach = [n for n, size in zip(node.inputs, sizes, strict=False) if size is None]
            if _too_deep(dg, out_of_reach, shape_infer.infer_out_channels_recursively, every=True):
                yield node, why
        elif node.type == _OPTYPE.RESHAPE:
            sizes = getattr(node.grad_fn, "_saved_self_sizes", None)
            if not (dg._2d_4d if sizes is None else len(sizes) in (1, 4)):
                continue  # not mapped at all
            if _too_deep(dg, node.outputs, shape_infer.infer_in_channels_recursively) or _too_deep(
                dg, node.inputs, shape_infer.infer_out_channels_recursively
            ):
                yield node, why


def _too_deep(dg: tp.DependencyGraph, nodes: Sequence[Node], search: Callable, every: bool = False) -> bool:
    """Whether Torch-Pruning's channel ``search`` (of ``shape_infer``) from ``nodes`` in order, until one finds a
    count (or from ``every`` one), passes its recursion limit."""
    for n in nodes:
        depth = [0]
        found = search(dg, n, depth)
        if depth[0] > constants.MAX_RECURSION_DEPTH:
            return True
        if found is not None and not every:
            return False
    return False


def prunable_groups(
    dg: tp.DependencyGraph,
    ignored: Sequence[nn.Module],
    root_types: tuple[type, ...],
    names: dict[nn.Module, str],
    split_roots: Collection[nn.Module] = (),
    unmapped: Mapping[Node, str] | None = None,
) -> tuple[list[nn.Module], dict[nn.Module, Any]]:
    """``(layers, groups)``: the layers of the model (``names``) to ignore beyond ``ignored`` so that no group
    Torch-Pruning cannot prune is pruned (module docstring), and ``{root: group}`` for every group that prunes
    (what ``dg.get_all_groups`` yields with both ignored: the groups a rejected one would reach are visited with it,
    so none of the groups kept holds a layer ignored after it was built), in one pass. Warns once, naming the groups
    kept whole.
    ``split_roots``: fused head projections whose channel split follows the pruned width (GPT-2's ``c_attn``, split
    by ``split_size``, which oba updates with the heads): their groups prune through the split. (Torch-Pruning 1.6
    maps the root's k and v channels ``E + c``, ``2E + c`` onto the output projection's inputs without taking the
    offset off; a whole head also holds its q channels ``c``, which map right, and the pruners skip indices beyond a
    layer's width, so such a group loses exactly the head's inputs of the output projection.)
    ``unmapped``: ``{node: why}``, the operations Torch-Pruning could not map channels through (:func:`build_graph`):
    the layers reaching them are kept whole, as those reaching a channel slice."""
    extra: list[nn.Module] = []
    reasons: list[str] = []
    for node, what in _blocking_nodes(dg, unmapped or {}).items():
        new = [m for m in _reaching_layers(node) if m in names and m not in ignored and m not in extra]
        if new:
            extra.extend(new)
            listed = ", ".join(repr(names[m]) for m in new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
            reasons.append(f"{listed} {what}")
    groups: dict[nn.Module, Any] = {}
    for group in dg.get_all_groups(ignored_layers=[*ignored, *extra], root_module_types=root_types):
        reason = _unmappable(dg, group, names, group[0].dep.target.module in split_roots)
        if reason:  # its output-side layers are visited: no later group holds them
            extra.extend(m for m in _output_side(dg, group) if m in names and m not in extra)
            reasons.append(reason)
        else:
            groups[group[0].dep.target.module] = group
    if reasons:
        more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        warnings.warn(
            f"{len(reasons)} groups of channels are not pruned (their layers are ignored), as Torch-Pruning cannot "
            f"prune through them: {'; '.join(reasons[:3])}{more}",
            stacklevel=3,
        )
    return extra, groups


def _output_side(dg: tp.DependencyGraph, group) -> list[nn.Module]:
    found: list[nn.Module] = []
    for dep, _ in group:
        m = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(m, nn.Module) and m not in found:
            found.append(m)
    return found


def _unmappable(dg: tp.DependencyGraph, group, names: dict[nn.Module, str], split_ok: bool = False) -> str | None:
    """Why ``group`` cannot be pruned as traced (a member's indices beyond its width, or a channel split), or None."""
    root = names.get(group[0].dep.target.module, "?")
    for dep, idxs in group:
        m = dep.target.module
        if dep.target.type == _OPTYPE.SPLIT and not split_ok and _channel_dim(dep.target.grad_fn):
            return f"the group rooted at {root!r} goes through a channel split (x.split(..., dim=1)) of fixed sizes"
        if not isinstance(m, nn.Module) or not idxs or next(m.parameters(recurse=False), None) is None:
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        width = dg.get_out_channels(m) if out else dg.get_in_channels(m)
        if width is not None and max(idxs) >= width and not split_ok:
            side = "output" if out else "input"
            return (
                f"the group rooted at {root!r} maps its {len(group[0].idxs)} channels onto {side} index {max(idxs)} "
                f"of {names.get(m, type(m).__name__)!r}, which has {width} (a reshape, transpose or split of another "
                "dimension)"
            )
    return None


def _channel_dim(grad_fn) -> bool:
    """Whether the slice/split of ``grad_fn`` is along the channel dimension (1 of 2-D and 4-D tensors, the last
    of 3-D token tensors ``[B, N, C]``, as Torch-Pruning maps them)."""
    dim, sizes = getattr(grad_fn, "_saved_dim", None), getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None or dim >= 2**31:
        return False
    ndim = len(sizes)
    return dim % ndim == (2 if ndim == 3 else 1)


def _is_channel_slice(node) -> bool:
    """A slice along channels that drops some (``x[:, a:b]`` not covering the whole range)."""
    fn = node.grad_fn
    if node.type != _OPTYPE.SLICE or not _channel_dim(fn):
        return False
    size = int(fn._saved_self_sym_sizes[fn._saved_dim])
    start, end, step = int(fn._saved_start or 0), fn._saved_end, int(fn._saved_step or 1)
    end = size if end is None else min(int(end), size)
    return not (start in (0, -size) and end >= size and step == 1)


def _blocking_nodes(dg: tp.DependencyGraph, unmapped: Mapping[Node, str]) -> dict[Node, str]:
    """``{node: why the layers reaching it are kept}``: the channel slices of ``dg`` and the ``unmapped``
    operations, in the words of the warning (after the names of the layers)."""
    found = {
        n: f"reach a channel slice ({n.grad_fn.name()}) whose bounds are fixed"
        for n in dg.module2node.values()
        if _is_channel_slice(n)
    }
    for node, why in unmapped.items():
        found[node] = f"reach {node.grad_fn.name()}: Torch-Pruning could not map channels through it ({why})"
    return found


def _reaching_layers(start: Node) -> list[nn.Module]:
    """The layers whose output channels reach ``start``: a walk from it through the nodes that keep channels
    (everything but non-depthwise conv and linear layers, which end the walk: a layer reached from its output side
    is collected, one reached from its input side is not; a depthwise conv is collected and passed through)."""
    layers: list[nn.Module] = []
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for nxt, upstream in [(n, True) for n in node.inputs] + [(n, False) for n in node.outputs]:
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt.type in _LAYERS:
                if upstream:
                    layers.append(nxt.module)
                continue
            if nxt.type == _OPTYPE.DEPTHWISE_CONV:
                layers.append(nxt.module)
            stack.append(nxt)
    return layers
