"""`pipeline.backbones`: the built-in backbone, checkpoint formats, and the errors before training.

Every checkpoint here is written by the test from a tiny timm ViT, so the tests run offline
on CPU in a few seconds; the only shipped file they read is the built-in backbone's weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from pipeline.backbones import (
    BUILTIN_WEIGHTS,
    backbone_data_config,
    create_backbone,
    head_prefixes,
    load_checkpoint,
)
from pipeline.config import BUILTIN_BACKBONE, BackboneConfig

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny_vit(seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY, pretrained=False, **{**TINY_KW, **overrides}).eval()


def tiny_config(checkpoint: Path, **overrides: object) -> BackboneConfig:
    return BackboneConfig(name=TINY, pretrained=False, checkpoint=checkpoint,
                          kwargs={**TINY_KW, **overrides})


def assert_same_tensors(loaded: dict[str, Tensor], source: dict[str, Tensor],
                        skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in source if not k.startswith(skip)]
    assert keys, "nothing to compare"
    for key in keys:
        torch.testing.assert_close(loaded[key], source[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------- built-in


def test_builtin_backbone_loads_the_shipped_weights() -> None:
    model = create_backbone(BackboneConfig())  # the default: karst_vit_fmnist, pretrained
    assert_same_tensors(model.state_dict(), safetensors.torch.load_file(BUILTIN_WEIGHTS))
    direct = timm.create_model(BUILTIN_BACKBONE, pretrained=True)  # plain timm, offline
    assert_same_tensors(direct.state_dict(), model.state_dict())


def test_builtin_weights_carry_their_recipe_and_accuracy() -> None:
    with safetensors.safe_open(BUILTIN_WEIGHTS, "pt") as file:
        meta = file.metadata()
    assert json.loads(meta["recipe"])["epochs"] >= 1
    assert float(meta["test_accuracy"]) > 0.8  # far above chance (0.1): really pretrained
    assert meta["architecture"] == BUILTIN_BACKBONE and meta["date"]
    assert BUILTIN_WEIGHTS.stat().st_size < 4_000_000


def test_builtin_architecture_fits_the_adapter_search() -> None:
    model = create_backbone(BackboneConfig(pretrained=False))
    assert 0.44e6 < sum(p.numel() for p in model.parameters()) < 0.47e6
    block = model.blocks[0]
    widths = {block.attn.qkv.in_features, block.attn.qkv.out_features, block.mlp.fc1.out_features}
    assert widths == {96, 288, 384}
    assert all(width % factor == 0 for width in widths for factor in (2, 4, 8, 16, 32))
    assert BUILTIN_BACKBONE in timm.list_models(pretrained=True)


def test_builtin_data_config() -> None:
    model = create_backbone(BackboneConfig(pretrained=False))
    assert backbone_data_config(model) == {"img_size": 28, "in_chans": 1,
                                           "mean": (0.2860,), "std": (0.3530,)}


def test_builtin_at_another_resolution_resizes_pos_embed() -> None:
    model = create_backbone(BackboneConfig(kwargs={"img_size": 32}))
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 96)
    assert backbone_data_config(model)["img_size"] == 32
    shipped = safetensors.torch.load_file(BUILTIN_WEIGHTS)
    assert_same_tensors(model.state_dict(), shipped, skip=("pos_embed",))


def test_data_config_of_a_grey_model_averages_imagenet_stats() -> None:
    config = backbone_data_config(tiny_vit(in_chans=1))
    assert config["in_chans"] == 1 and config["img_size"] == 32
    assert len(config["mean"]) == 1 and len(config["std"]) == 1


# --------------------------------------------------------------------------- formats


def google_npz(model: nn.Module, path: Path) -> None:
    """The original Google ViT release layout (what timm's `_load_weights` reads)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, dim = model.blocks[0].attn.num_heads, model.embed_dim
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        p, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = g + "MultiHeadDotProductAttention_1/"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            w[f"{g}{ln}/scale"] = sd[f"{p}{norm}.weight"]
            w[f"{g}{ln}/bias"] = sd[f"{p}{norm}.bias"]
        qkv_w, qkv_b = np.split(sd[p + "attn.qkv.weight"], 3), np.split(sd[p + "attn.qkv.bias"], 3)
        for name, weight, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w[f"{attn}{name}/kernel"] = weight.T.reshape(dim, heads, dim // heads)
            w[f"{attn}{name}/bias"] = bias.reshape(heads, dim // heads)
        w[f"{attn}out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        w[f"{attn}out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            w[f"{g}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{p}mlp.fc{r + 1}.weight"].T
            w[f"{g}MlpBlock_3/Dense_{r}/bias"] = sd[f"{p}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


WRITERS: dict[str, Callable[[nn.Module, Path], Path]] = {
    "pth": lambda m, d: _save(d / "w.pth", m.state_dict()),
    "pt-nested-state_dict": lambda m, d: _save(d / "w.pt", {"state_dict": m.state_dict(),
                                                            "epoch": 3}),
    "pth-nested-model": lambda m, d: _save(d / "w.pth", {"model": m.state_dict()}),
    "safetensors": lambda m, d: _safetensors(d / "w.safetensors", m.state_dict()),
    "npz": lambda m, d: (google_npz(m, d / "w.npz"), d / "w.npz")[1],
}


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _safetensors(path: Path, state: dict[str, Tensor]) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_checkpoint_format_loads_exactly(fmt: str, tmp_path: Path) -> None:
    source = tiny_vit(seed=1)
    path = WRITERS[fmt](source, tmp_path)
    model = create_backbone(tiny_config(path))
    assert_same_tensors(model.state_dict(), source.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images))


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_checkpoint_of_another_resolution_is_resized(fmt: str, tmp_path: Path) -> None:
    source = tiny_vit(seed=1)
    model = create_backbone(tiny_config(WRITERS[fmt](source, tmp_path), img_size=48))
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    assert_same_tensors(model.state_dict(), source.state_dict(), skip=("pos_embed",))


def test_head_of_another_shape_is_dropped(tmp_path: Path) -> None:
    source = tiny_vit(seed=1)
    path = WRITERS["safetensors"](source, tmp_path)
    model = tiny_vit(seed=2, num_classes=5)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_checkpoint(model, path)
    assert set(report.dropped) == {"head.weight", "head.bias"} and not report.missing
    assert_same_tensors(model.head.state_dict(), head_before)
    assert_same_tensors(model.state_dict(), source.state_dict(), skip=head_prefixes(model))


def test_missing_or_extra_head_is_tolerated(tmp_path: Path) -> None:
    headless = WRITERS["pth"](tiny_vit(seed=1, num_classes=0), tmp_path)
    assert set(load_checkpoint(tiny_vit(), headless).missing) == {"head.weight", "head.bias"}
    with_head = _save(tmp_path / "head.pth", tiny_vit(seed=1).state_dict())
    report = load_checkpoint(tiny_vit(num_classes=0), with_head)
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    npz = WRITERS["npz"](tiny_vit(seed=1), tmp_path)
    create_backbone(tiny_config(npz, num_classes=7))  # timm skips the mis-shaped npz head


# --------------------------------------------------------------------------- errors


def test_non_head_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    path = WRITERS["safetensors"](tiny_vit(mlp_ratio=8.0), tmp_path)
    with pytest.raises(ValueError, match=r"backbone\.checkpoint: .*w\.safetensors does not fit "
                       r"VisionTransformer: blocks\.0\.mlp\.fc1\.weight is \(256, 32\) in the "
                       r"file, \(128, 32\) in the model;.*Only the classifier head may differ"):
        create_backbone(tiny_config(path))


def test_unexpected_key_is_an_error(tmp_path: Path) -> None:
    state = {**tiny_vit().state_dict(), "extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"backbone\.checkpoint: .*w\.pth does not fit "
                       r"VisionTransformer: unexpected extra\.weight \(3,\)"):
        create_backbone(tiny_config(_save(tmp_path / "w.pth", state)))


def test_missing_key_is_an_error(tmp_path: Path) -> None:
    state = tiny_vit().state_dict()
    del state["blocks.1.norm1.weight"]
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer: missing "
                       r"blocks\.1\.norm1\.weight \(32,\)"):
        create_backbone(tiny_config(_save(tmp_path / "w.pth", state)))


def test_npz_of_a_shallower_model_is_an_error(tmp_path: Path) -> None:
    path = WRITERS["npz"](tiny_vit(depth=1), tmp_path)
    with pytest.raises(ValueError, match=r"backbone\.checkpoint: .*w\.npz lacks "
                       r"'Transformer/encoderblock_1/LayerNorm_0/scale'"):
        create_backbone(tiny_config(path))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"backbone\.checkpoint: .*nowhere\.pth is not a file"):
        create_backbone(tiny_config(tmp_path / "nowhere.pth"))


@pytest.mark.parametrize("name, content, message", [
    ("w.pth", b"not a checkpoint", r"cannot read .*w\.pth as \.pth"),
    ("w.safetensors", b"\x00" * 16, r"cannot read .*w\.safetensors as \.safetensors"),
    ("w.ckpt", b"", r"has suffix '\.ckpt'; use one of \.npz, \.pth, \.pt, \.safetensors"),
])
def test_unreadable_file_is_an_error(name: str, content: bytes, message: str,
                                     tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"backbone\.checkpoint: .*{message}"):
        create_backbone(tiny_config(tmp_path / name))


def test_unknown_model_name_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"backbone\.name: 'vit_tiny_patch61_224' is not a timm "
                       r"model; did you mean .*'vit_tiny_patch16_224'"):
        create_backbone(BackboneConfig(name="vit_tiny_patch61_224", pretrained=False))


def test_bad_kwargs_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"backbone\.kwargs: 'vit_tiny_patch16_224' does not "
                       r"accept \{'no_such_option': 1\}"):
        create_backbone(BackboneConfig(name=TINY, pretrained=False,
                                       kwargs={"no_such_option": 1}))
