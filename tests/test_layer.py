import pytest
import torch
from torch import nn

from karst import AdaptedLinear, KroneckerDelta, Rescale, kronecker_delta
from karst.functional import dense_kronecker_linear
from karst.layer import LowRankDelta


def random_kernels(n=3, factor=(2, 4), d_out=12, d_in=16, rank=2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    p, q = d_out // factor[0], d_in // factor[1]
    return [torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
            for shape in ((n, *factor), (n, p, rank), (n, rank, q))]


def test_delta_is_the_sum_of_kronecker_products():
    C, A, B = random_kernels()
    expected = sum(torch.kron(C[i], A[i] @ B[i]) for i in range(C.shape[0])) * 0.5
    torch.testing.assert_close(kronecker_delta(C, A, B, 0.5), expected)


def test_factored_forward_equals_delta_times_x():
    delta = KroneckerDelta(12, 16, num_kernels=3, factor=(2, 4), rank=2, scale=0.7)
    nn.init.normal_(delta.B)
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(delta(x), x @ delta.delta_weight().t(), atol=1e-5, rtol=1e-5)


RESCALE_CASES = {  # s1, s2 of each re-scaling, and s1 = -1 where h can't be recovered from y
    "none": (None, None, True),
    "channel": ("channel", "channel", True),
    "scalar": ("scalar", "scalar", True),
    "channel-no-bias": ("channel", None, False),
    "channel-zero-gain": ("zero-gain", "channel", True),
}


def rescale_tensor(kind):
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(5)
    shape = (1,) if kind == "scalar" else (12,)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
    if kind == "zero-gain":
        t[3] = -1.0
    return t.requires_grad_()


@pytest.mark.parametrize("case", list(RESCALE_CASES))
def test_dense_form_gradients_match_numerical_ones(case):
    s1_kind, s2_kind, has_bias = RESCALE_CASES[case]
    C, A, B = random_kernels()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True) if has_bias else None
    s1, s2 = rescale_tensor(s1_kind), rescale_tensor(s2_kind)
    named = {"x": x, "weight": weight, "bias": bias, "C": C, "A": A, "B": B, "s1": s1, "s2": s2}
    present = [name for name, t in named.items() if t is not None]

    def layer(*tensors):
        t = dict.fromkeys(named) | dict(zip(present, tensors, strict=True))
        return dense_kronecker_linear(t["x"], t["weight"], t["bias"], t["C"], t["A"], t["B"],
                                      0.3, t["s1"], t["s2"])

    assert torch.autograd.gradcheck(layer, [named[name] for name in present])


def make_layer(mode: str, rescale: str = "channel", bias: bool = True) -> AdaptedLinear:
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=bias).requires_grad_(False)
    delta = KroneckerDelta(12, 16, num_kernels=2, factor=(2, 4), rank=2, scale=0.5)
    res = Rescale(12, mode=rescale, has_bias=bias)
    for p in list(delta.parameters()) + list(res.parameters()):
        nn.init.normal_(p, std=0.2)
    return AdaptedLinear(base, delta, res, forward_mode=mode)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_and_factored_forms_agree_in_value_and_gradient(bias):
    x = torch.randn(4, 6, 16)
    results = {}
    for mode in ("dense", "factored"):
        layer = make_layer(mode, bias=bias)
        out = layer(x)
        (out * torch.linspace(-1, 1, 12)).sum().backward()
        results[mode] = (out, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["dense"][0], results["factored"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(grad, results["factored"][1][name], atol=1e-4, rtol=1e-4)


def test_auto_rule_picks_dense_for_many_tokens_and_factored_for_few():
    delta = KroneckerDelta(768, 768, num_kernels=2, factor=(8, 8), rank=4, scale=1.0)
    assert delta._dense_pays(torch.empty(8 * 197, 768))
    assert not delta._dense_pays(torch.empty(2, 768))


@pytest.mark.parametrize("rescale", ["channel", "scalar"])
def test_merge_matches_and_unmerge_restores_bit_for_bit(rescale):
    layer = make_layer("auto", rescale=rescale)
    original = layer.base_layer.weight.clone()
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_refuses_non_finite_weights():
    layer = make_layer("auto")
    with torch.no_grad():
        layer.delta.C[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged


def test_lora_delta_matches_its_weight():
    delta = LowRankDelta(12, 16, rank=3, scale=2.0)
    nn.init.normal_(delta.B)
    x = torch.randn(5, 16)
    torch.testing.assert_close(delta(x), x @ delta.delta_weight().t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_half_precision_models_train_with_float32_adapters(mode):
    layer = make_layer(mode)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = layer(x)
    out.float().sum().backward()
    assert layer.delta.B.grad.dtype == torch.float32 and layer.delta.B.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_autocast_bfloat16_matches_float32(mode):
    layer = make_layer(mode)
    x = torch.randn(4, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.float().sum().backward()
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    assert layer.delta.A.grad.dtype == torch.float32
