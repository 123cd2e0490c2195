"""KARST with one kernel and no re-scaling is LoKr: check it against HF peft's LoKr."""

import pytest
import torch
from conftest import make_model

from karst import AdaptedLinear, apply_karst, lokr_config, merge_karst

peft = pytest.importorskip("peft")

TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


@pytest.mark.parametrize(("factor", "rank", "alpha"), [(4, 2, 4.0), (8, 3, 1.5)])
def test_karst_n1_equals_peft_lokr_with_the_same_weights(factor, rank, alpha, images):
    torch.manual_seed(3)
    reference = peft.get_peft_model(
        make_model("vit"),
        peft.LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, target_modules=TARGETS,
                        init_weights=False),  # random weights, so that the test can fail
    ).eval()
    ours = apply_karst(make_model("vit"), lokr_config(factor=factor, rank=rank, alpha=alpha))

    copied = 0
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, AdaptedLinear):
                theirs = reference.get_submodule(f"base_model.model.{name}")
                layer.delta.C[0].copy_(theirs.lokr_w1["default"])
                layer.delta.A[0].copy_(theirs.lokr_w2_a["default"])
                layer.delta.B[0].copy_(theirs.lokr_w2_b["default"])
                copied += 1
    assert copied == 8

    expected = reference(images)
    assert (expected - make_model("vit")(images)).abs().max() > 1e-3
    torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-4)

    merged_theirs = reference.merge_and_unload().state_dict()
    merged_ours = merge_karst(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_ours.items():
        torch.testing.assert_close(value, merged_theirs[key], atol=1e-6, rtol=1e-5)
