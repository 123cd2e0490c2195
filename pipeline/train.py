"""The fine-tuning loop: AdamW, cosine schedule with linear warm-up, per-epoch callback."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import Split


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    val_accuracy: float
    epoch_seconds: float


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(
        (model(split.images[i:i + batch_size]).argmax(-1) == split.labels[i:i + batch_size])
        .sum().item()
        for i in range(0, len(split), batch_size)
    )
    return correct / len(split)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    warmup_epochs: int = 1,
    seed: int = 0,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> list[EpochReport]:
    """Train the parameters that require grad; report train loss and val accuracy per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = cosine_with_warmup(optimizer, warmup_epochs * steps_per_epoch,
                                   epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    reports = []
    for epoch in range(1, epochs + 1):
        start, model_loss = time.perf_counter(), 0.0
        model.train()
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model_loss += loss.item() * len(index)
        report = EpochReport(epoch, model_loss / len(train), accuracy(model, val),
                             time.perf_counter() - start)
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return reports
