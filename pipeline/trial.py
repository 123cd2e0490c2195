"""One trial end to end: backbone + task + adapter from a `TrialConfig`, fit, test.

Everything that can be wrong with a config is checked in `prepare_trial`, before the first
training step: the backbone and its weights, the data, the class count, and whether the
adapter fits the backbone's layer shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import karst
from pipeline.backbones import backbone_data_config, create_backbone
from pipeline.config import TrialConfig
from pipeline.data import Task, load_task
from pipeline.train import EpochReport, Schedule, accuracy, fit


@dataclass(frozen=True)
class PreparedTrial:
    model: nn.Module
    task: Task
    params: int  # closed-form adapter count, head excluded


@dataclass(frozen=True)
class TrialResult:
    reports: list[EpochReport]
    test_accuracy: float
    params: int
    model: nn.Module


def schedule_of(config: TrialConfig) -> Schedule:
    o = config.optim
    return Schedule(epochs=config.epochs, batch_size=config.batch_size, lr=o.lr,
                    weight_decay=o.weight_decay, warmup_epochs=o.warmup_epochs,
                    label_smoothing=o.label_smoothing, grad_clip=o.grad_clip, seed=config.seed)


def prepare_trial(config: TrialConfig, device: torch.device | str = "cpu") -> PreparedTrial:
    """Build and check everything; raises `ValueError` naming the config field at fault."""
    model = create_backbone(config.backbone)
    task = load_task(config.task, seed=config.seed, **backbone_data_config(model))
    torch.manual_seed(config.seed)  # head and adapter initialisation
    model.reset_classifier(task.num_classes)
    try:
        params = karst.param_count(model, config.adapter)
    except ValueError as err:
        raise ValueError(f"adapter: {err}") from None
    karst.apply_karst(model, config.adapter)
    return PreparedTrial(model.to(device), task, params)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_trial(
    config: TrialConfig,
    *,
    prepared: PreparedTrial | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> TrialResult:
    """Fine-tune as `config` says; resumes from `checkpoint_dir` when it holds a checkpoint.

    Pass `prepared` (from `prepare_trial`) when the caller has already validated.
    """
    prepared = prepared or prepare_trial(config, default_device())
    reports = fit(prepared.model, prepared.task.train, prepared.task.val, schedule_of(config),
                  on_epoch=on_epoch, checkpoint_dir=checkpoint_dir)
    return TrialResult(reports, accuracy(prepared.model, prepared.task.test), prepared.params,
                       prepared.model)
