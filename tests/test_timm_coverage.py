"""The timm families Torch-Pruning's dependency graph mis-traces (#13): each prunes to 0.6 of its MACs in 2 steps,
runs afterwards, and saves and loads to the same outputs.

What each one exercises: GhostNet ties two root channels of its residual groups (``cat([x1, dwconv(x1)])``: both are
channel ``k`` of ``x1``), which must go together; CSPNet splits channels with ``x.split(C // 2, dim=1)``; ReXNet slices
channels (``cat([x[:, :C] + shortcut, x[:, C:]])``) and Torch-Pruning's traversal of those groups never ends;
MLP-Mixer's token MLP runs on ``x.transpose(1, 2)``; LeViT and EfficientFormer split ``qkv`` along a head dimension;
PoolFormer's ``Scale`` caches ``shape = (dim, 1, 1)``; DPN concatenates channel slices of its dense path with a sum
(``cat([x[:, :C] + out1, x[:, C:], out2])``), which Torch-Pruning's index mapping fails on (it cannot count the
channels of a slice: ``oba.depgraph.build_graph`` maps the rest of the graph around it). The groups Torch-Pruning
cannot prune through stay whole (a warning names them); the rest of each model prunes.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba
from oba.flops import count_flops
from oba.prune_step import _tied_units
from oba.target import TargetNotReachedError

timm = pytest.importorskip("timm", reason="timm is in the 'models' extra (scripts/env.sh installs it)")

KEEP = 0.6

FAMILIES = {  # name: (create kwargs, input side, the groups kept whole); small configs, the smallest inputs they take
    "ghostnet_050": ({}, 32, None),
    "cspresnet50": ({}, 32, r"'stages\.\d\.[a-z_.0-9]+\.conv' goes through a channel split"),
    "rexnet_100": ({"width_mult": 0.5}, 32, r"'features\.\d+\.conv_pwl\.conv'.* reach a channel slice"),
    "mixer_s16_224": ({"img_size": 32}, 32, r"onto output index \d+ of 'blocks\.\d\.mlp_tokens\.fc2', which has 4"),
    "levit_128s": ({"img_size": 64}, 64, r"onto input index \d+ of 'stages\.\d\.blocks\.\d\.attn\.proj"),
    "efficientformer_l1": (
        {"depths": (1, 1, 1, 2), "embed_dims": (16, 32, 48, 64)},
        224,  # the attention of the last stage is built for 7x7 tokens
        r"onto input index \d+ of 'stages\.3\.blocks\.\d\.token_mixer\.proj'",
    ),
    "poolformer_s12": ({}, 32, None),
    "dpn68": ({}, 32, r"'features\.conv5_3\.c1x1_c\.conv'.* reach a channel slice"),
}


def data(side: int, n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, side, side, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(n)]


def prune(model: nn.Module, example: torch.Tensor, batches: list, keep: float = KEEP) -> None:
    oba.prune_structured(
        model, example, "magnitude", keep_flops=keep, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=batches, progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_prunes_to_the_target_runs_and_round_trips(name, tmp_path):
    kwargs, side, kept_whole = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    example, batches = torch.randn(1, 3, side, side), data(side)
    dense = count_flops(model, example)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(model, example, batches)
    said = [str(w.message) for w in caught if "groups of channels are not pruned" in str(w.message)]
    if kept_whole is None:
        assert not said
    else:
        assert len(said) == 1 and re.search(kept_whole, said[0]), said
    kept = count_flops(model, example).macs / dense.macs
    assert 0.5 < kept <= KEEP + 1e-9
    with torch.no_grad():
        out = model(batches[0][0])
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    oba.save_pruned(model, tmp_path / "pruned.pt", f"timm:{name}", {"num_classes": 10, **kwargs})
    loaded = oba.load_pruned(tmp_path / "pruned.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0][0]), out)


class _Ghost(nn.Module):
    """GhostNet's module: a conv, a depthwise conv of its output, both concatenated, sliced to ``out`` channels."""

    def __init__(self, c_in: int, out: int) -> None:
        super().__init__()
        half = (out + 1) // 2
        self.primary = nn.Conv2d(c_in, half, 1)
        self.cheap = nn.Conv2d(half, half, 3, padding=1, groups=half)
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, : self.out]


class _GhostNet(nn.Module):
    """A stem and a residual ghost module (its output adds to the stem's): the residual group ties channel ``k``
    to channel ``k + 4``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ghost = _Ghost(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ghost(x)
        return self.fc(x.mean((2, 3)))


def _residual_group(model: _GhostNet):
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8), verbose=False)
    return dg, dg.get_pruning_group(model.stem, tp.prune_conv_out_channels, list(range(8)))


def test_tied_root_channels_of_a_ghost_module_are_one_unit():
    dg, group = _residual_group(_GhostNet())
    units = [(c,) for c in range(len(group[0].idxs))]
    assert sorted(map(sorted, _tied_units(dg, group[0].dep.target.module, group[0].dep.handler, units))) == [
        [0, 4], [1, 5], [2, 6], [3, 7]
    ]  # fmt: skip


def test_a_ghost_module_keeps_a_channel_when_its_residual_group_is_pruned_hard():
    """The regression: the floor counted 8 root channels where Torch-Pruning removes them in tied pairs, so pruning
    "4 of 8" emptied the ghost module's convs (a 0-channel layer)."""
    torch.manual_seed(0)
    model = _GhostNet().eval()
    with torch.no_grad():  # the residual group's channels 0..3 (and so their partners 4..7) score least
        model.stem.weight[:4] *= 1e-3
        model.ghost.primary.weight[:] *= 1e-3
    example, side = torch.randn(1, 3, 8, 8), 8
    dense = count_flops(model, example).macs
    prune(model, example, data(side), keep=0.25)
    assert model.ghost.primary.out_channels >= 1 and model.stem.out_channels >= 2
    assert model.stem.out_channels == 2 * model.ghost.primary.out_channels  # the pairs went together
    assert count_flops(model, example).macs / dense <= 0.25 + 1e-9
    assert model(torch.randn(2, 3, side, side)).shape == (2, 10)


def test_pruned_model_is_untouched_when_every_group_is_unprunable():
    """A model whose only prunable group goes through a channel slice refuses before anything changes."""

    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            return self.fc(self.conv(x)[:, :6].mean((2, 3)))

    model = Sliced().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        pytest.warns(UserWarning, match=r"'conv'.*channel slice"),
        pytest.raises(ValueError, match="no prunable group"),
    ):
        oba.prune_structured(model, torch.randn(1, 3, 8, 8), "magnitude", keep_flops=0.6, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_exact_oba_differentiates_through_attention_bias_caches():
    """LeViT's attention caches ``attention_biases[:, idxs]`` in eval mode; the exact HVP differentiates with respect
    to fresh copies of the parameters, which the cache would bypass ("differentiated tensor not used in the graph").
    Inside ``curvature_context`` such modules compute the bias afresh (train mode, same values); the exact HVP then
    equals double backward through the autograd engine, and pruning with exact OBA meets its target."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64).eval()
    x, y = data(64, 1)[0]
    with torch.no_grad():
        model(x)  # fills the caches
    attn = [m for m in model.modules() if isinstance(getattr(m, "attention_bias_cache", None), dict)]
    assert attn and all(m.attention_bias_cache for m in attn)
    params = dict(model.named_parameters())
    v = {n: torch.randn_like(p) for n, p in params.items()}
    hv = oba.curvature.hvp(model, F.cross_entropy, (x, y), v)
    with oba.curvature_context(model):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()), create_graph=True)
        dot = sum((g * v[n]).sum() for n, g in zip(params, grads, strict=True))
        reference = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
    for (n, p), r in zip(params.items(), reference, strict=True):
        torch.testing.assert_close(hv[n], torch.zeros_like(p) if r is None else r, rtol=1e-4, atol=1e-5)
    assert not model.training and not any(m.training for m in attn)
    example = torch.randn(1, 3, 64, 64)
    dense = count_flops(model, example)
    oba.prune_structured(
        model, example, "oba", keep_flops=KEEP, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=data(64), progress=False,
    )  # fmt: skip
    assert count_flops(model, example).macs / dense.macs <= KEEP + 1e-9


def test_round_to_takes_tied_channels_in_whole_pairs():
    """``round_to`` rounds a group's width with whole units: a tied pair is never split (Torch-Pruning would take the
    partner along, beyond the rounding and the count of removed channels)."""
    torch.manual_seed(0)
    model = _GhostNet().eval()
    example = torch.randn(1, 3, 8, 8)
    _, history = oba.prune_structured(model, example, "magnitude", keep_flops=0.6, round_to=4, progress=False)
    assert (model.stem.out_channels, model.ghost.primary.out_channels) == (4, 2)
    assert sum(h["removed"] for h in history) == 8 - model.stem.out_channels
    assert history[-1]["flops_kept"] <= 0.6

    # widths 8, 6, 4, 2 in pairs: 6 is the only multiple of 3, and it keeps more than 0.7 of the MACs
    model = _GhostNet().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetNotReachedError, match="round_to=3"):
        oba.prune_structured(model, example, "magnitude", keep_flops=0.7, round_to=3, progress=False)
    assert model.stem.out_channels == 8 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
