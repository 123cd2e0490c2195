"""Tasks: train / val / test splits and a class count, at the backbone's resolution.

Small tasks live in memory as tensors (`TensorSplit`); folders stream from disk through
DataLoader workers (`FolderSplit`). Both give (images, labels) batches, normalised with the
backbone's mean and std, with the backbone's channel count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory: float images `(n, c, h, w)`, already normalised, and labels."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        order = (torch.randperm(len(self), generator=generator) if shuffle
                 else torch.arange(len(self)))
        for index in order.split(batch_size):
            yield self.images[index], self.labels[index]


@dataclass(frozen=True)
class Task:
    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
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
    train_split, val_split, test_split = (TensorSplit(images[i], labels[i]) for i in parts)
    return Task("digits", train_split, val_split, test_split, num_classes=10)
