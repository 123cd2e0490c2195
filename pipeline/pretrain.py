"""`karst pretrain`: how the built-in backbone's shipped weights were made, reproducibly.

Full training of `karst_vit_fmnist` on Fashion-MNIST's 60 000 images (Debian package
`dataset-fashion-mnist`, or torchvision's download when online), fixed recipe, weights saved
as safetensors with the recipe and the test accuracy in the file's metadata
(docs/backbone.md).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from torch import nn

from pipeline.backbones import BUILTIN_ARCH, BUILTIN_WEIGHTS, FMNIST_MEAN, FMNIST_STD
from pipeline.config import BUILTIN_BACKBONE
from pipeline.data import TensorSplit
from pipeline.train import Schedule, accuracy, fit

FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: The recipe `karst pretrain` runs; saved in the weights file's metadata.
PRETRAIN_RECIPE: dict[str, Any] = dict(epochs=4, batch_size=128, lr=2e-3, weight_decay=0.05,
                                       warmup_epochs=1, label_smoothing=0.0, grad_clip=1.0,
                                       seed=0)


def read_idx(path: Path, header: int) -> np.ndarray:
    """An IDX file (gzipped or not) as uint8: 16 header bytes for images, 8 for labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        return np.frombuffer(file.read(), dtype=np.uint8, offset=header)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem,
                      directory / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(data_dir: Path | None = None) -> Path:
    """The folder holding the four IDX files: `data_dir`, Debian's, or torchvision's download."""
    directory = data_dir or FMNIST_DEBIAN_DIR
    stems = [stem for pair in FMNIST_FILES.values() for stem in pair]
    if all(_idx_path(directory, stem) for stem in stems):
        return directory
    root = data_dir or Path.home() / ".cache" / "karst-search"
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as err:  # offline: no route, DNS or HTTP errors
        raise ValueError(f"--data-dir: no Fashion-MNIST IDX files in {directory} and the "
                         f"download failed ({err}); run `apt-get install "
                         "dataset-fashion-mnist` or pass --data-dir") from err
    return root


def fashion_mnist(data_dir: Path | None = None) -> dict[str, Any]:
    """Train (60 000) and test (10 000) splits, normalised as the built-in cfg says."""
    directory = find_fashion_mnist(data_dir)
    splits = {}
    for split, (images_stem, labels_stem) in FMNIST_FILES.items():
        images = read_idx(_idx_path(directory, images_stem), 16).reshape(-1, 1, 28, 28)
        labels = read_idx(_idx_path(directory, labels_stem), 8)
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
        splits[split] = TensorSplit((pixels - FMNIST_MEAN[0]) / FMNIST_STD[0],
                                    torch.from_numpy(labels.astype(np.int64)))
    return splits


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    test_accuracy: float
    seconds: float
    reports: list[Any]


def pretrain_builtin(
    *,
    epochs: int = PRETRAIN_RECIPE["epochs"],
    out: Path = BUILTIN_WEIGHTS,
    data_dir: Path | None = None,
    device: str = "cpu",
    on_epoch: Callable[[Any], None] | None = None,
) -> PretrainResult:
    """Train `karst_vit_fmnist` from scratch on Fashion-MNIST and save its weights to `out`.

    The test split is only watched (per-epoch accuracy), never used to pick anything: the
    recipe is fixed in `PRETRAIN_RECIPE`, so the final test accuracy is an honest number.
    """
    splits = fashion_mnist(data_dir)
    recipe = {**PRETRAIN_RECIPE, "epochs": epochs}
    torch.manual_seed(recipe["seed"])
    model = timm.create_model(BUILTIN_BACKBONE, pretrained=False).to(device)
    start = time.perf_counter()
    reports = fit(model, splits["train"], splits["test"], Schedule(**recipe), on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, splits["test"])
    metadata = {
        "architecture": BUILTIN_BACKBONE, "arch": json.dumps(BUILTIN_ARCH),
        "recipe": json.dumps(recipe), "optimizer": "AdamW, cosine with linear warm-up",
        "data": "Fashion-MNIST: 60000 train images, test accuracy on the 10000 test images",
        "normalisation": json.dumps({"mean": FMNIST_MEAN, "std": FMNIST_STD}),
        "test_accuracy": f"{test_accuracy:.4f}", "train_seconds": f"{seconds:.0f}",
        "device": str(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "timm": timm.__version__,
        "command": f"karst pretrain --epochs {epochs}",
        "epochs_log": json.dumps([asdict(r) for r in reports]),
    }
    path = save_weights(model, out, metadata)
    return PretrainResult(path, test_accuracy, seconds, reports)


def save_weights(model: nn.Module, out: Path, metadata: dict[str, str]) -> Path:
    """fp32 safetensors, written atomically so an interrupted run leaves the old file intact."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items()}
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as tmp:
        pass
    safetensors.torch.save_file(state, tmp.name, metadata=metadata)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it 0600: unreadable to others
    os.replace(tmp.name, out)
    return out
