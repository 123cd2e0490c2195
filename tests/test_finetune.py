"""A short KARST fine-tune on real data (scikit-learn's digits) learns, and merges exactly."""

import pytest
import timm
import torch

from karst import KarstConfig, LinearProbeConfig, apply_karst, merge_karst
from pipeline.config import TaskConfig
from pipeline.data import load_task
from pipeline.train import Schedule, accuracy, fit


def fine_tune(config, task, epochs=12):
    torch.manual_seed(0)  # the same random, frozen backbone for every config
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2,
                              in_chans=1, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                              global_pool="avg")
    apply_karst(model, config)
    reports = fit(model, task.train, task.val, Schedule(epochs=epochs, lr=1e-2, batch_size=32))
    return model, reports


@pytest.mark.slow
def test_karst_fine_tune_on_digits_beats_chance_and_the_linear_probe():
    task = load_task(TaskConfig(name="digits"), img_size=8, in_chans=1, mean=(0.5,), std=(0.5,))
    model, reports = fine_tune(
        KarstConfig(num_kernels=4, factor=4, rank=4, alpha=8.0, init="kaiming"), task
    )
    assert reports[-1].train_loss < 0.7 * reports[0].train_loss
    karst_accuracy = accuracy(model, task.test)
    probe, _ = fine_tune(LinearProbeConfig(), task)
    probe_accuracy = accuracy(probe, task.test)
    assert karst_accuracy > 0.4  # chance is 0.1; measured 0.58
    assert karst_accuracy > probe_accuracy + 0.2  # measured 0.20 for the probe
    merge_karst(model)
    assert accuracy(model, task.test) == pytest.approx(karst_accuracy, abs=2e-3)
