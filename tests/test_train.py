"""The training loop: a resumed run continues exactly as if it had never stopped."""

import pytest
import timm
import torch

from karst import KarstConfig, apply_karst
from pipeline.data import TensorSplit
from pipeline.train import CHECKPOINT_NAME, Schedule, fit


class Interrupted(Exception):
    pass


def toy_split(n: int, seed: int) -> TensorSplit:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = torch.randn(n, 1, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1).float()
    return TensorSplit(images, labels)


def adapted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                              in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                              drop_path_rate=0.3)  # drop-path draws from the global RNG
    return apply_karst(model, KarstConfig(num_kernels=2, factor=4, rank=2))


SCHEDULE = Schedule(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1, label_smoothing=0.1,
                    grad_clip=1.0, seed=7)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    train, val = toy_split(64, 1), toy_split(32, 2)
    straight = adapted_model()
    expected = fit(straight, train, val, SCHEDULE)

    def stop_after_two(report):
        if report.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(adapted_model(), train, val, SCHEDULE, on_epoch=stop_after_two,
            checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    torch.manual_seed(123)  # whatever happened to the global RNG meanwhile
    resumed = adapted_model()
    seen = []
    reports = fit(resumed, train, val, SCHEDULE, on_epoch=seen.append, checkpoint_dir=tmp_path)

    assert [r.epoch for r in seen] == [3, 4]
    assert [(r.train_loss, r.val_accuracy) for r in reports] == \
        [(r.train_loss, r.val_accuracy) for r in expected]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(),
                                     strict=True):
        assert torch.equal(a, b), name


def test_training_lowers_the_loss_and_diverging_is_an_error():
    train, val = toy_split(64, 1), toy_split(32, 2)
    reports = fit(adapted_model(), train, val, SCHEDULE)
    assert reports[-1].train_loss < reports[0].train_loss
    with pytest.raises(FloatingPointError, match="train loss became nan at epoch 1, step 1;"):
        bad = TensorSplit(train.images * float("nan"), train.labels)
        fit(adapted_model(), bad, val, SCHEDULE)
