"""The fine-tuning loop, the same alone and inside a Ray Tune worker.

AdamW over the parameters that require grad, cosine schedule with linear warm-up, optional
label smoothing and gradient clipping, bf16 autocast on GPU. Validation every epoch, metrics
out through a callback, a checkpoint every epoch from which a resumed run continues exactly
as if it had never stopped.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    val_accuracy: float
    epoch_seconds: float


@dataclass(frozen=True)
class Schedule:
    """What `fit` needs from a trial config (kept here so the loop has no config import)."""

    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0


class Batches(Protocol):
    """What `fit` needs from a data split: its length and (images, labels) batches."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterable[tuple[Tensor, Tensor]]: ...


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on GPU; fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, split: Batches, batch_size: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for images, labels in split.batches(batch_size):
        with autocast_for(device):
            logits = model(images.to(device, non_blocking=True))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
    return correct / len(split)


class Trainer:
    """Holds everything a resumed run needs: model, optimiser, schedule, RNG states."""

    def __init__(self, model: nn.Module, schedule: Schedule, train: Batches) -> None:
        self.model = model
        self.schedule = schedule
        self.train_split = train
        self.device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=schedule.lr,
                                           weight_decay=schedule.weight_decay)
        steps = math.ceil(len(train) / schedule.batch_size)
        self.scheduler = cosine_with_warmup(self.optimizer, schedule.warmup_epochs * steps,
                                            schedule.epochs * steps)
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self.reports: list[EpochReport] = []

    def train_epoch(self) -> float:
        model, s = self.model, self.schedule
        model.train()
        total, seen, epoch = 0.0, 0, len(self.reports) + 1
        batches = self.train_split.batches(s.batch_size, shuffle=True, generator=self.generator)
        for step, (images, labels) in enumerate(batches, start=1):
            images, labels = images.to(self.device), labels.to(self.device)
            with autocast_for(self.device):
                loss = F.cross_entropy(model(images), labels, label_smoothing=s.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):  # stop at once: every later step would be wasted
                raise FloatingPointError(f"train loss became {value} at epoch {epoch}, step "
                                         f"{step}; lower optim.lr or set optim.grad_clip.")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            total += value * len(labels)
            seen += len(labels)
        return total / seen

    def state_dict(self) -> dict:
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters()
                     if p.requires_grad}
        return {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "reports": [asdict(r) for r in self.reports],
        }

    def load_state_dict(self, state: dict) -> None:
        missing = self.model.load_state_dict(state["trainable"], strict=False).unexpected_keys
        if missing:
            raise ValueError(f"checkpoint holds tensors this model lacks: {missing[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.reports = [EpochReport(**r) for r in state["reports"]]


def save_checkpoint(trainer: Trainer, directory: Path) -> Path:
    """Write atomically, so an interrupted save never leaves a torn checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
        torch.save(trainer.state_dict(), tmp)
    os.replace(tmp.name, path)
    return path


def load_checkpoint(trainer: Trainer, directory: Path) -> bool:
    """Restore `trainer` from `directory` if it holds a checkpoint; True when it did."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return False
    trainer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    schedule: Schedule,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> list[EpochReport]:
    """Train for `schedule.epochs`, resuming from `checkpoint_dir` when it holds a checkpoint.

    `on_epoch` sees every epoch this call runs (not those restored from the checkpoint).
    """
    trainer = Trainer(model, schedule, train)
    if checkpoint_dir is not None:
        load_checkpoint(trainer, checkpoint_dir)
    for epoch in range(len(trainer.reports) + 1, schedule.epochs + 1):
        start = time.perf_counter()
        train_loss = trainer.train_epoch()
        report = EpochReport(epoch, train_loss, accuracy(model, val),
                             time.perf_counter() - start)
        trainer.reports.append(report)
        if checkpoint_dir is not None:
            save_checkpoint(trainer, checkpoint_dir)
        if on_epoch is not None:
            on_epoch(report)
    return trainer.reports
