import pytest
import torch
from conftest import make_model, randomise_adapters
from safetensors.torch import load_file

from karst import (
    FullFinetuneConfig,
    KarstConfig,
    LoraConfig,
    apply_karst,
    load_adapter,
    read_adapter_config,
    save_adapter,
)


@pytest.mark.parametrize("config", [KarstConfig(num_kernels=2, factor=(4, 2), rank=3),
                                    LoraConfig(rank=2), FullFinetuneConfig()])
def test_round_trip_reproduces_outputs_exactly(config, tmp_path, images):
    trained = apply_karst(make_model("vit", seed=0), config)
    randomise_adapters(trained)
    with torch.no_grad():
        trained.get_classifier().weight.add_(1.0)  # the head is saved too
    path = save_adapter(trained, tmp_path / "adapter.safetensors")

    assert read_adapter_config(path) == config
    stored = load_file(str(path))
    assert set(stored) == {n for n, p in trained.named_parameters() if p.requires_grad}

    for fresh in (make_model("vit", seed=0), apply_karst(make_model("vit", seed=0), config)):
        load_adapter(fresh, path)
        assert torch.equal(fresh(images), trained(images))


def test_loading_into_a_different_adapter_is_refused(tmp_path):
    path = save_adapter(apply_karst(make_model("vit"), LoraConfig(rank=2)), tmp_path / "a.st")
    other = apply_karst(make_model("vit"), LoraConfig(rank=4))
    with pytest.raises(ValueError, match="carries adapter config .* but .* holds"):
        load_adapter(other, path)


def test_loading_into_another_architecture_is_refused(tmp_path):
    path = save_adapter(apply_karst(make_model("vit"), LoraConfig(rank=2)), tmp_path / "a.st")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(make_model("vit", num_classes=5), path)


def test_a_file_without_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.st"))
    with pytest.raises(ValueError, match="not a karst adapter file"):
        read_adapter_config(tmp_path / "plain.st")
