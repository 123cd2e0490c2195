"""Tasks: train / val / test tensors and a class count, small enough to live in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Split:
    images: Tensor  # (n, channels, height, width), float32, normalised
    labels: Tensor  # (n,), int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Task:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int


def digits_task(*, img_size: int = 8, train: int = 800, val: int = 200, seed: int = 0) -> Task:
    """scikit-learn's 1 797 real 8×8 handwritten digits, split 800 / 200 / rest (VTAB-1k style)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    if img_size != images.shape[-1]:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                               align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order[:train], order[train:train + val], order[train + val:]
    train_split, val_split, test_split = (Split(images[i], labels[i]) for i in parts)
    return Task("digits", train_split, val_split, test_split, num_classes=10)
