"""The four-term Hessian decomposition against the exact HVP, dense oracles and closed forms (float64)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_ggn, random_vector, rel_err
from torch import nn

from oba.curvature import flatten_params, gradient, hessian, hvp, param_slices, select_params, unflatten_params
from oba.decompose import TERMS, HessianDecomposition, decomposed_hvp, hessian_block_structure, term_hvp
from oba.toynets import TOY_CASES, make_case

EXACT_RTOL = 1e-10
WITH_PRODUCTS = {"attention_layernorm", "attention_plain", "multihead_attention"}  # activation x activation
WITH_CURVATURE = {"mlp_gelu", "cnn_bn_train", "residual_bn_train"} | WITH_PRODUCTS  # GELU, LN, BN-train, softmax


def parts_of(case, v):
    return {t: flatten_params(p) for t, p in decomposed_hvp(case.model, case.loss_fn, case.batch, v).items()}


@pytest.mark.parametrize("name", TOY_CASES)
def test_terms_sum_to_the_exact_hvp(name):
    case = make_case(name)
    v = random_vector(select_params(case.model))
    parts = parts_of(case, v)
    assert list(parts) == list(TERMS)
    exact = flatten_params(hvp(case.model, case.loss_fn, case.batch, v))
    assert rel_err(sum(parts.values()), exact) < EXACT_RTOL
    one_sweep = flatten_params(term_hvp(case.model, case.loss_fn, case.batch, v))  # sources summed, one backward
    assert rel_err(one_sweep, exact) < EXACT_RTOL


@pytest.mark.parametrize("name", TOY_CASES)
def test_gauss_newton_term_is_the_dense_gauss_newton_matrix(name):
    case = make_case(name)
    v = random_vector(select_params(case.model))
    gn = parts_of(case, v)["gauss_newton"]
    assert rel_err(gn, dense_ggn(case) @ flatten_params(v)) < EXACT_RTOL


@pytest.mark.parametrize("name", TOY_CASES)
def test_which_terms_vanish(name):
    """Parallel needs an activation x activation product; nonlinear a curved op (not ReLU/max-pool)."""
    case = make_case(name)
    parts = parts_of(case, random_vector(select_params(case.model)))
    assert (parts["parallel"].abs().max() == 0) == (name not in WITH_PRODUCTS)
    assert (parts["nonlinear"].abs().max() == 0) == (name not in WITH_CURVATURE)
    assert parts["series"].abs().max() > 0 and parts["gauss_newton"].abs().max() > 0


def test_euler_series_term_of_a_bias_free_relu_net():
    """Logits homogeneous of degree 3 in θ: (T2 + T3 + T4) θ = 2 g, and T3 = T4 = 0, so T2 θ = 2 g."""
    case = make_case("mlp_relu_nobias")
    theta = select_params(case.model)
    series = flatten_params(term_hvp(case.model, case.loss_fn, case.batch, theta, terms=("series", "parallel")))
    g = flatten_params(gradient(case.model, case.loss_fn, case.batch))
    assert rel_err(series, 2 * g) < EXACT_RTOL


class OneHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_series_and_nonlinear_terms_in_closed_form():
    """y = W2 gelu(W1 x + b1) + b2, written out by hand.

    With h = W1 x + b1, G = ∂L/∂y per sample, dh = dW1 x + db1:
    T4 v: (W1, b1) get Σ_n [(W2ᵀG) ⊙ gelu''(h) ⊙ dh] (xᵀ, 1);
    T2 v: W2 gets Σ_n G (gelu'(h) ⊙ dh)ᵀ (downward), (W1, b1) get Σ_n [gelu'(h) ⊙ dW2ᵀG] (xᵀ, 1) (upward).
    """
    torch.manual_seed(0)
    model = OneHidden().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    v = random_vector(select_params(model), seed=3)
    parts = decomposed_hvp(model, F.cross_entropy, (x, y), v)

    W1, b1, W2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    h = x @ W1.T + b1
    z = model(x).detach()
    G = (torch.softmax(z, 1) - F.one_hot(y, 3)) / len(y)
    phi = torch.exp(-(h**2) / 2) / math.sqrt(2 * math.pi)
    d1 = 0.5 * (1 + torch.erf(h / math.sqrt(2))) + h * phi  # gelu'
    d2 = phi * (2 - h**2)  # gelu''
    dh = x @ v["fc1.weight"].T + v["fc1.bias"]

    s4 = (G @ W2) * d2 * dh
    expected_t4 = {"fc1.weight": s4.T @ x, "fc1.bias": s4.sum(0)}
    up = d1 * (G @ v["fc2.weight"])
    expected_t2 = {"fc1.weight": up.T @ x, "fc1.bias": up.sum(0), "fc2.weight": G.T @ (d1 * dh)}
    for name, t in parts["nonlinear"].items():
        torch.testing.assert_close(t, expected_t4.get(name, torch.zeros_like(t)), rtol=1e-12, atol=1e-14)
    for name, t in parts["series"].items():
        torch.testing.assert_close(t, expected_t2.get(name, torch.zeros_like(t)), rtol=1e-12, atol=1e-14)
    assert parts["parallel"]["fc1.weight"].abs().max() == 0


def dense_terms(case):
    primals = select_params(case.model)
    size = sum(p.numel() for p in primals.values())
    eye = torch.eye(size, dtype=torch.float64)
    decomposition = HessianDecomposition(case.model, case.loss_fn)
    cols = {t: [] for t in TERMS}
    for i in range(size):
        for t, part in decomposition(case.batch, unflatten_params(eye[i], primals)).items():
            cols[t].append(flatten_params(part))
    return {t: torch.stack(c, dim=1) for t, c in cols.items()}


@pytest.mark.parametrize("name", ["mlp_gelu", "cnn_bn_train"])
def test_dense_terms_sum_to_hessian_and_are_symmetric(name):
    case = make_case(name)
    terms = dense_terms(case)
    H = hessian(case.model, case.loss_fn, case.batch)
    assert rel_err(sum(terms.values()), H) < EXACT_RTOL
    for t, M in terms.items():
        assert rel_err(M, M.T) < EXACT_RTOL if M.abs().max() > 0 else True, t

    layers, blocks = hessian_block_structure(case.model, case.loss_fn, case.batch)
    slices = param_slices(select_params(case.model))
    layer_idx = {layer: [] for layer in layers}
    for n, s in slices.items():
        layer_idx[n.rpartition(".")[0]].extend(range(s.start, s.stop))
    scale = max(M.abs().max() for M in terms.values())
    for t, M in terms.items():
        dense_blocks = torch.tensor(
            [[M[layer_idx[k]][:, layer_idx[c]].abs().max() > 1e-8 * scale for c in layers] for k in layers]
        )
        assert torch.equal(blocks[t], dense_blocks), t
        if t == "series":
            # a layer's own diagonal block has no series part: W-X coupling needs X upstream of W
            assert not blocks[t].diagonal().any()


def test_block_structure_of_attention():
    case = make_case("attention_layernorm")
    layers, blocks = hessian_block_structure(case.model, case.loss_fn, case.batch)
    i = {layer: n for n, layer in enumerate(layers)}
    # q and k feed the two operands of QKᵀ: coupled by the parallel term, not by the series term
    assert blocks["parallel"][i["q"], i["k"]] and blocks["parallel"][i["k"], i["q"]]
    assert blocks["parallel"][i["v"], i["q"]]  # softmax(QKᵀ) V: v with q and k
    assert not blocks["series"][i["q"], i["k"]]
    # a layer's own block has no series part; a parallel part only where the layer feeds both operands of a
    # product: norm1 (upstream of q and k), not the projections themselves
    assert not blocks["series"].diagonal().any()
    assert blocks["parallel"].diagonal().tolist() == [layer == "norm1" for layer in layers]
    assert blocks["gauss_newton"].diagonal().all()


def test_decomposition_leaves_the_model_alone():
    case = make_case("cnn_bn_train")
    before = {k: t.clone() for k, t in case.model.state_dict().items()}
    decomposed_hvp(case.model, case.loss_fn, case.batch, random_vector(select_params(case.model)))
    for k, t in case.model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert case.model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in case.model.modules())


@pytest.mark.parametrize("name", TOY_CASES)
@pytest.mark.parametrize("terms", [("series", "parallel"), ("gauss_newton", "nonlinear"), ("nonlinear",)])
def test_a_sum_of_terms_in_one_sweep_equals_the_sum_of_the_parts(name, terms):
    """``hvp(terms)`` sums the sources first (and skips unwanted closed-form ones): same as adding the parts."""
    case = make_case(name)
    v = random_vector(select_params(case.model))
    parts = parts_of(case, v)
    summed = flatten_params(term_hvp(case.model, case.loss_fn, case.batch, v, terms=terms))
    expected = sum(parts[t] for t in terms)
    assert (summed - expected).abs().max() <= EXACT_RTOL * max(expected.abs().max(), parts["gauss_newton"].abs().max())


def test_subset_of_terms_and_parameters():
    case = make_case("attention_plain")
    names = ["q.weight", "k.weight", "head.bias"]
    v = random_vector(select_params(case.model, names))
    full = decomposed_hvp(case.model, case.loss_fn, case.batch, v, names)
    two = term_hvp(case.model, case.loss_fn, case.batch, v, names, terms=("series", "parallel"))
    for n in names:
        torch.testing.assert_close(two[n], full["series"][n] + full["parallel"][n], rtol=1e-12, atol=1e-14)
    assert list(two) == names


def test_errors():
    case = make_case("mlp_relu")
    v = random_vector(select_params(case.model))
    with pytest.raises(ValueError, match="unknown term"):
        decomposed_hvp(case.model, case.loss_fn, case.batch, v, terms=("gauss_newton", "quartic"))

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x), x

    model = TwoOutputs().double()
    with pytest.raises(TypeError, match="single tensor"):
        decomposed_hvp(model, lambda z, y: z[0].sum(), case.batch, OrderedDict(random_vector(select_params(model))))


def test_a_decomposition_is_reusable_across_batches_and_weight_changes():
    case = make_case("cnn_bn_train")
    decomposition = HessianDecomposition(case.model, case.loss_fn)
    v = random_vector(select_params(case.model))
    x, y = case.batch
    other = (torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5)), y.flip(0))
    for batch in (case.batch, other):
        parts = decomposition(batch, v)
        exact = flatten_params(hvp(case.model, case.loss_fn, batch, v))
        assert rel_err(sum(flatten_params(p) for p in parts.values()), exact) < EXACT_RTOL
    with torch.no_grad():  # new weight values, same structure: the cached trace must follow them
        for p in case.model.parameters():
            p.mul_(1.1)
    parts = decomposition(case.batch, v)
    exact = flatten_params(hvp(case.model, case.loss_fn, case.batch, v))
    assert rel_err(sum(flatten_params(p) for p in parts.values()), exact) < EXACT_RTOL
    assert len(decomposition._graphs) == 1
    case.model.eval()  # a different mode is a different graph
    parts = decomposition(case.batch, v)
    exact = flatten_params(hvp(case.model, case.loss_fn, case.batch, v))
    assert rel_err(sum(flatten_params(p) for p in parts.values()), exact) < EXACT_RTOL
    assert len(decomposition._graphs) == 2


class Gated(nn.Module):
    """y = W_o [(W_a x) ⊙ (W_b x)]: an activation x activation product, the simplest parallel coupling."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5, bias=False), nn.Linear(4, 5, bias=False)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.out(self.a(x) * self.b(x))


def test_parallel_term_in_closed_form():
    """With u = W_a x, w = W_b x, G_h = W_oᵀ G (gradient at h = u ⊙ w):
    T3 v: W_a gets Σ_n (G_h ⊙ dW_b x) xᵀ and W_b gets Σ_n (G_h ⊙ dW_a x) xᵀ; nothing else."""
    torch.manual_seed(0)
    model = Gated().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    v = random_vector(select_params(model), seed=4)
    parts = decomposed_hvp(model, F.cross_entropy, (x, y), v)
    G = (torch.softmax(model(x).detach(), 1) - F.one_hot(y, 3)) / len(y)
    g_h = G @ model.out.weight.detach()
    expected = {
        "a.weight": (g_h * (x @ v["b.weight"].T)).T @ x,
        "b.weight": (g_h * (x @ v["a.weight"].T)).T @ x,
        "out.weight": torch.zeros(3, 5, dtype=torch.float64),
    }
    for name, t in parts["parallel"].items():
        torch.testing.assert_close(t, expected[name], rtol=1e-12, atol=1e-14)
    assert all(t.abs().max() == 0 for t in parts["nonlinear"].values())
    exact = flatten_params(hvp(model, F.cross_entropy, (x, y), v))
    assert rel_err(sum(flatten_params(p) for p in parts.values()), exact) < EXACT_RTOL


def test_closed_form_batch_norm_tangents_match_torch_func():
    """The traced forward's closed-form train-mode BatchNorm tangents (output, mean, inv_std) = torch.func.jvp."""
    from torch.func import jvp

    from oba.curvature import curvature_context, split_batch
    from oba.decompose import _Trace

    case = make_case("residual_bn_train")
    decomposition = HessianDecomposition(case.model, case.loss_fn)
    state, (args, _) = decomposition._state(), split_batch(case.batch)
    tangents = random_vector(select_params(case.model))
    with curvature_context(case.model):
        trace = _Trace(decomposition._graph(state, args), state, tangents, args)
        checked = 0
        for node, op in trace.ops.items():
            if "native_batch_norm" in str(node.target):
                primal = tuple(trace.value[op.leaves[k]] for k in op.slots)
                tangent = tuple(trace.tangent[op.leaves[k]] for k in op.slots)
                _, (expected_y, _, _) = jvp(lambda *xs, op=op: op.call(xs, trace.value), primal, tangent)
                # torch's forward AD gives the saved statistics no tangent: differentiate them directly
                x, eps = trace.value[node.args[0]], node.args[7]

                def stats(x, eps=eps):
                    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
                    return mean, (var + eps).rsqrt()

                _, expected_stats = jvp(stats, (x,), (trace.tangent[node.args[0]],))
                mine_y, *mine_stats = trace.tangent[node]
                assert rel_err(mine_y, expected_y) < EXACT_RTOL
                for mine, ref in zip(mine_stats, expected_stats, strict=True):
                    assert rel_err(mine, ref) < EXACT_RTOL
                checked += 1
    assert checked == 2
