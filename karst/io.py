"""Save and load the trainable tensors of an adapted model, with its config, as safetensors.

The file holds exactly the tensors that train (adapters, re-scaling, head) and the config
as JSON metadata, so `load_adapter` can rebuild the adapter on a plain backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from karst.config import AdapterConfig, config_from_dict
from karst.model import adapter_config, apply_karst

FORMAT_VERSION = "1"


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the trainable tensors of `model` and its adapter config to `path`."""
    config = adapter_config(model)
    tensors = {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"karst_format": FORMAT_VERSION, "config": config.to_json()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """The adapter config stored in a file written by `save_adapter`."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} is not a karst adapter file (no 'config' in its metadata).")
    return config_from_dict(json.loads(metadata["config"]))


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by `save_adapter` into `model`, in place.

    A plain backbone is adapted first with the stored config; an already adapted model
    must carry the same config. Every stored tensor must land, and every trainable one
    must be in the file.
    """
    stored = read_adapter_config(path)
    if hasattr(model, "karst_config"):
        if adapter_config(model) != stored:
            raise ValueError(
                f"model carries adapter config {adapter_config(model)} but {path} holds "
                f"{stored}; load into a plain backbone or one adapted with the stored config."
            )
    else:
        apply_karst(model, stored)
    tensors = load_file(str(path), device=str(_device_of(model)))
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(tensors))
    unexpected = sorted(set(tensors) - set(trainable))
    misshapen = [f"{n}: file {tuple(t.shape)} vs model {tuple(trainable[n])}"
                 for n, t in tensors.items() if n in trainable and t.shape != trainable[n]]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{path} does not fit this model: missing tensors {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {misshapen[:5]}. Was it saved from the same "
            "architecture and class count?"
        )
    model.load_state_dict(tensors, strict=False)
    return model


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
