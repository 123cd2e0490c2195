import itertools

import pytest
import timm
import torch
from conftest import MODELS, make_model, randomise_adapters
from torch import nn

from karst import (
    AdaptedLinear,
    FullFinetuneConfig,
    KarstConfig,
    LinearProbeConfig,
    LoraConfig,
    RescaleConfig,
    apply_karst,
    lokr_config,
    merge_karst,
    param_count,
    trainable_parameters,
)

KARST_GRID = [
    KarstConfig(num_kernels=n, factor=f, rank=r, rescale=s)
    for n, f, r, s in itertools.product((1, 2, 8), (2, (4, 2), 8), (1, 3),
                                        ("channel", "scalar", "none"))
]
BASELINES = [lokr_config(factor=4, rank=2), LoraConfig(rank=4), RescaleConfig(),
             RescaleConfig(rescale="scalar"), LinearProbeConfig(), FullFinetuneConfig(),
             KarstConfig(targets=("*mlp.fc1",), factor=(1, 8), rank=2)]


def config_id(config) -> str:
    return config.method + "-" + "-".join(
        str(v) for k, v in config.to_dict().items() if k not in ("method", "targets")
    )


def gradient_count(model: nn.Module, images: torch.Tensor) -> int:
    """Parameters that really receive a gradient, head excluded."""
    head = {id(p) for p in model.get_classifier().parameters()}
    model(images).square().mean().backward()
    return sum(p.numel() for p in model.parameters()
               if p.grad is not None and id(p) not in head)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("config", KARST_GRID + BASELINES, ids=config_id)
def test_param_count_equals_parameters_that_get_gradients(kind, config, images):
    model = make_model(kind)
    expected = param_count(model, config)
    apply_karst(model, config)
    randomise_adapters(model)  # B = 0 would starve no gradient, but s1 = 0 hides nothing
    assert gradient_count(model, images) == expected
    assert trainable_parameters(model)["adapter"] == expected


def test_param_count_allocates_nothing():
    with torch.device("meta"):
        model = make_model("vit")
    config = KarstConfig(num_kernels=2, factor=8, rank=2)
    assert param_count(model, config) == param_count(make_model("vit"), config) > 0


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("config", [KarstConfig(num_kernels=8, factor=4, rank=2),
                                    LoraConfig(rank=2)], ids=config_id)
def test_adapted_model_starts_as_the_backbone(kind, config, images):
    model = make_model(kind)
    expected = model(images)
    apply_karst(model, config)
    assert torch.equal(model(images), expected)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rescale", ["channel", "scalar", "none"])
@pytest.mark.parametrize("num_kernels", [1, 2, 8])
def test_merged_model_computes_what_the_adapted_one_does(kind, rescale, num_kernels, images):
    name, kwargs = MODELS[kind]
    model = make_model(kind)
    apply_karst(model, KarstConfig(num_kernels=num_kernels, factor=4, rank=2, rescale=rescale))
    randomise_adapters(model)
    adapted = model(images)
    assert (adapted - make_model(kind)(images)).abs().max() > 1e-4  # 10x the tolerance below
    merge_karst(model)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    vanilla = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    vanilla.load_state_dict(model.state_dict(), strict=True)
    assert (vanilla(images) - adapted).abs().max() <= 1e-5


@pytest.mark.parametrize("config", [LoraConfig(rank=2), RescaleConfig()], ids=config_id)
def test_baselines_merge_too(config, images):
    model = make_model("vit")
    apply_karst(model, config)
    randomise_adapters(model)
    adapted = model(images)
    torch.testing.assert_close(merge_karst(model)(images), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_head_train():
    model = make_model("vit")
    apply_karst(model, KarstConfig(factor=4, rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".delta." in n or ".rescale." in n for n in trainable)
    assert not model.pos_embed.requires_grad


def test_distilled_deit_keeps_both_heads_trainable(images):
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
    config = KarstConfig(factor=4, rank=2)
    expected = param_count(model, config)
    apply_karst(model, config)
    assert trainable_parameters(model) == {"adapter": expected, "head": 2 * (64 * 10 + 10)}
    model.eval()
    randomise_adapters(model)
    adapted = model(images)
    torch.testing.assert_close(merge_karst(model)(images), adapted, atol=1e-5, rtol=1e-5)


def test_any_model_with_linear_targets():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(8, 16))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(16, 4))
    config = KarstConfig(num_kernels=2, factor=2, rank=1, targets=("fc1", "fc2"))
    expected = param_count(model, config)
    apply_karst(model, config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


BAD_APPLY = [
    (KarstConfig(factor=3), r"factor=\(3, 3\) does not divide target 'blocks.0.attn.qkv' of "
     r"shape \(out=192, in=64\).*as one int: \[1, 2, 4, 8, 16, 32, 64\]"),
    (KarstConfig(factor=8, rank=8), r"rank=8 is not below d/f=8 for target 'blocks.0.attn.qkv'"
     r".*choose rank in 1..7"),
    (LoraConfig(rank=64), r"rank=64 is not below d=64"),
    (KarstConfig(targets=("*blocks.*.attn.qkv", "*mlp.fc3")),
     r"targets pattern '\*mlp.fc3' matches no nn.Linear module. Some linear modules"),
    (KarstConfig(targets=("head",)), r"matches the classifier head 'head'"),
]


@pytest.mark.parametrize(("config", "message"), BAD_APPLY)
def test_bad_config_fails_before_anything_changes(config, message):
    model = make_model("vit")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for call in (param_count, apply_karst):
        with pytest.raises(ValueError, match=message):
            call(model, config)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_applying_twice_is_refused():
    model = apply_karst(make_model("vit"), KarstConfig(factor=4, rank=2))
    with pytest.raises(ValueError, match="already carries an adapter"):
        apply_karst(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already carries an adapter"):
        apply_karst(apply_karst(make_model("vit"), LinearProbeConfig()), LinearProbeConfig())
