"""Tests of oba.flops: MAC counts of known models, meta-device counting, pruned models."""

from __future__ import annotations

import time
import types

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from oba.flops import FlopCount, count_flops, count_nonzero_params, count_params
from oba.models.cifar_resnet import resnet20, resnet56
from oba.models.torchvision_models import resnet50, vit_b_16

CIFAR_INPUT = (1, 3, 32, 32)
IMAGENET_INPUT = (1, 3, 224, 224)


@pytest.mark.parametrize("build, macs", [(resnet20, 40.8e6), (resnet56, 125e6)])
def test_cifar_resnet_macs(build, macs):
    count = count_flops(build(), CIFAR_INPUT)
    assert count.macs == pytest.approx(macs, rel=0.01)
    assert count.flops == 2 * count.macs


def test_resnet50_macs_on_meta_are_fast():
    model = resnet50()
    start = time.perf_counter()
    count = count_flops(model, IMAGENET_INPUT)
    elapsed = time.perf_counter() - start
    assert count.macs == pytest.approx(4.1e9, rel=0.01)
    assert count.params == pytest.approx(25.56e6, rel=0.001)
    assert elapsed < 5.0, f"counting took {elapsed:.1f} s"


def test_vit_b_16_macs():
    with torch.device("meta"):  # avoids initialising 86M real weights
        model = vit_b_16()
    count = count_flops(model, IMAGENET_INPUT)
    assert count.macs == pytest.approx(17.6e9, rel=0.01)
    assert count.params == pytest.approx(86.57e6, rel=0.001)
    assert count.nonzero_params is None  # a meta model has no values
    with pytest.raises(ValueError, match="meta"):
        count_flops(model, IMAGENET_INPUT, device="cpu")


def test_users_model_is_untouched():
    model = resnet20().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, torch.randn(4, 3, 32, 32))
    assert model.training
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats


def test_input_forms_and_devices_agree():
    model = resnet20()
    reference = count_flops(model, CIFAR_INPUT)
    assert count_flops(model, torch.randn(*CIFAR_INPUT)) == reference
    assert count_flops(model, torch.Size(CIFAR_INPUT), device="cpu") == reference
    assert count_flops(model, CIFAR_INPUT, device=None) == reference
    assert count_flops(model, (2, 3, 32, 32)).macs == 2 * reference.macs  # whole batch
    with pytest.raises(TypeError, match="shape"):
        count_flops(model, "1x3x32x32")


def test_several_input_tensors():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16, bias=False)

        def forward(self, a, b):  # [N, 8], [N, 16, 5] -> [N, 5]
            return (self.proj(a).unsqueeze(1) @ b).squeeze(1)

    count = count_flops(Bilinear(), [torch.randn(3, 8), torch.randn(3, 16, 5)])
    assert count.macs == 3 * 8 * 16 + 3 * 16 * 5
    assert count.params == 8 * 16


def test_torch_pruning_pruned_model_counts_fewer_macs():
    model = resnet20().eval()
    dense = count_flops(model, CIFAR_INPUT)
    # Prune only inside the blocks (conv1 -> bn1 -> conv2); the option-A residual stream stays.
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3) for block in stage]
    ignored = [model.conv1, model.linear] + [block.conv2 for block in blocks]
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(*CIFAR_INPUT),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=ignored,
    )
    pruner.step()
    assert blocks[0].conv1.out_channels == 8
    pruned = count_flops(model, CIFAR_INPUT)
    # Every block's conv1 -> conv2 channels halve; the stem conv and the classifier do not.
    stem_and_head = 16 * 3 * 3 * 3 * 32 * 32 + 64 * 10
    assert pruned.macs == (dense.macs - stem_and_head) // 2 + stem_and_head
    assert pruned.params < dense.params == count_params(resnet20())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torch_nn_utils_prune_counts_the_effective_weight_once():
    model = resnet20()
    dense = count_flops(model, CIFAR_INPUT)
    layer = model.layer1[0].conv1  # 16 * 16 * 3 * 3 = 2304 weights
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert hasattr(layer, "weight_orig") and hasattr(layer, "weight_mask")
    count = count_flops(model, CIFAR_INPUT)
    assert count.params == dense.params  # weight_orig once, the mask buffer not at all
    assert count.macs == dense.macs  # masked weights still cost dense compute
    assert count.nonzero_params == dense.nonzero_params - 1152
    assert count_nonzero_params(model) == count.nonzero_params
    assert count_flops(model, CIFAR_INPUT, device="cpu") == count
    assert count_flops(model, CIFAR_INPUT, device=None) == count
    assert isinstance(count, FlopCount)


def test_macs_by_module_splits_the_total_over_the_layers():
    from oba.flops import macs_by_module

    model = resnet20()
    per_module = macs_by_module(model, (2, 3, 32, 32))
    assert per_module[""] == count_flops(model, (2, 3, 32, 32)).macs
    leaves = {n for n, m in model.named_modules() if not list(m.children())}
    assert sum(v for n, v in per_module.items() if n in leaves) == per_module[""]
    assert per_module["layer1.0.conv1"] == 2 * 16 * 16 * 9 * 32 * 32


def test_latency_is_the_median_of_timed_passes_in_eval_mode_and_restores_the_mode(monkeypatch):
    from oba.flops import latency_ms

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return x * 2

    clock = iter([0.0, 10.0, 10.002, 20.0, 20.005, 30.0, 30.001])  # warm-up (not timed), then 2, 5, 1 ms
    monkeypatch.setattr("oba.flops.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    model = Probe().train()
    assert latency_ms(model, torch.ones(2), repeats=3) == pytest.approx(2.0)
    assert seen == [(False, True)] * 4 and model.training
    with pytest.raises(ValueError, match="repeats must be a whole number"):
        latency_ms(model, torch.ones(2), repeats=0)


def _flop_counter_table(model, x, grad):
    """MACs per module name (``""``: total) as torch's own FlopCounterMode counts them on ``model(x)``."""
    from torch.utils.flop_counter import FlopCounterMode

    root = type(model).__name__
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as counted_forward: the fused kernel is invisible to counters
    try:
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    table = {
        ("" if k == root else k.removeprefix(root + ".")): sum(ops.values()) // 2
        for k, ops in counter.get_flop_counts().items()
        if k != "Global"
    }
    return {**table, "": counter.get_total_flops() // 2}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", ["resnet18", "vit", "mha", "conv_transpose_sdpa"])
def test_per_module_counts_equal_flop_counter_mode(case, grad):
    """oba's counter (global module hooks, no backward tracking) gives FlopCounterMode's table, module by module,
    in a pass with autograd (Torch-Pruning's tracing) and without; nested, reused and functional-only work included;
    on a meta replica too, where repeated operations reuse their outputs' shapes."""
    import torchvision

    from oba.flops import counted_forward, macs_by_module

    torch.manual_seed(0)
    if case == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
    elif case == "vit":
        model = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)
        x = torch.randn(1, 3, 32, 32)
    elif case == "mha":  # one module called twice, attention done in F.multi_head_attention_forward
        mha = nn.MultiheadAttention(16, 4, batch_first=True)

        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn, self.head = mha, nn.Linear(16, 3)

            def forward(self, x):
                return self.head(self.attn(self.attn(x, x, x)[0], x, x)[0])

        model, x = Twice(), torch.randn(2, 5, 16)
    else:

        class Up(nn.Module):
            def __init__(self):
                super().__init__()
                self.up, self.proj = nn.ConvTranspose2d(3, 8, 2, stride=2), nn.Linear(8, 24)

            def forward(self, x):
                t = self.up(x).flatten(2).transpose(1, 2)
                q, k, v = self.proj(t).chunk(3, -1)
                return nn.functional.scaled_dot_product_attention(q, k, v)

        model, x = Up(), torch.randn(1, 3, 4, 4)
    model.eval()
    expected = _flop_counter_table(model, x, grad)
    with torch.set_grad_enabled(grad):
        _, got = counted_forward(model, x)
    assert got == expected
    assert got[""] > 0
    assert macs_by_module(model, x) == expected  # on meta
    from torch.nn.modules import module as module_module

    assert not module_module._global_forward_hooks and not module_module._global_forward_pre_hooks
