"""Tasks: train / val / test splits and a class count, at the backbone's resolution.

`load_task` reads a `TaskConfig` (built-in digits, a VTAB-1k folder, an ImageFolder tree or
a torchvision dataset) and returns splits the training loop can batch. Small tasks live in
memory as tensors (`TensorSplit`); larger ones stream from disk through DataLoader workers
(`FolderSplit`). Both give `(images, labels)` batches: float32 `(b, c, h, w)` at the
backbone's size and channel count, normalised with its mean and std, and int64 labels.

Both paths run the same per-image steps (resize, channels, [optional RandAugment on uint8],
normalise) with the same seeds, so a task gives the same batches in memory or streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipeline.config import TaskConfig
from pipeline.readers import (
    ArraySource,
    FileSource,
    Source,
    Sources,
    builtin_arrays,
    check_class_count,
    check_headers,
    read_folder,
    read_torchvision,
    read_vtab,
)

#: Tasks with at most this many images (all splits) are decoded once into memory.
IN_MEMORY_LIMIT = 5000
_CHUNK = 256  # images prepared at once when building an in-memory split (bounds peak memory)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's RGB → L


@dataclass(frozen=True)
class ImageFormat:
    """What the backbone wants: a square side, a channel count, per-channel mean and std."""

    size: int
    chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.chans not in (1, 3):
            raise ValueError(f"backbone in_chans={self.chans}: tasks convert images to 1 or 3 "
                             "channels; use a backbone with in_chans 1 or 3")
        if self.size < 1:
            raise ValueError(f"backbone img_size={self.size} must be a positive side length")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.chans):
                raise ValueError(f"backbone {name}={values} needs 1 or {self.chans} values "
                                 f"(one per channel)")
        if min(self.std) <= 0:
            raise ValueError(f"backbone std={self.std} must be positive")

    def fit(self, images: Tensor) -> Tensor:
        """Float `(n, c, h, w)` in [0, 1] → `(n, chans, size, size)`, still in [0, 1]."""
        if images.shape[1] == 3 and self.chans == 1:
            luma = images.new_tensor(_LUMA).view(1, 3, 1, 1)
            images = (images * luma).sum(1, keepdim=True)
        elif images.shape[1] not in (1, self.chans):
            raise ValueError(f"an image with {images.shape[1]} channels cannot become "
                             f"{self.chans}; give images with 1 or 3 channels")
        if images.shape[-2:] != (self.size, self.size):
            shrink = max(images.shape[-2:]) > self.size
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=shrink).clamp(0, 1)
        return images.expand(-1, self.chans, -1, -1).contiguous()

    def normalise(self, images: Tensor) -> Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


def to_uint8(images: Tensor) -> Tensor:
    return (images * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Augmenter:
    """RandAugment on uint8 images, one seed per image: the same seed, the same augmentation."""

    fmt: ImageFormat

    def __call__(self, raw: Tensor, seeds: list[int]) -> Tensor:
        """uint8 `(b, c, h, w)` → augmented and normalised float32 images."""
        from torchvision.transforms import v2

        transform = v2.RandAugment()
        out = torch.empty_like(raw)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny per-image ops: thread hand-offs cost 50x the work
        try:
            with torch.random.fork_rng(devices=[]):  # RandAugment draws from the global RNG
                for i, seed in enumerate(seeds):
                    torch.default_generator.manual_seed(seed)  # CPU only: cheap
                    out[i] = transform(raw[i])
        finally:
            torch.set_num_threads(threads)
        return self.fmt.normalise(out.float() / 255)


def epoch_plan(n: int, shuffle: bool, augment: bool,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """The order of one pass and, when augmenting, one seed per position (from `generator`)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if not augment:
        return order, None
    base = int(torch.randint(0, 2**62, (), generator=generator))
    return order, base + torch.arange(n)


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory: float images `(n, c, h, w)`, already normalised, and labels.

    With an `augmenter`, `raw` holds the same images as uint8 for RandAugment to work on.
    """

    images: Tensor
    labels: Tensor
    raw: Tensor | None = None
    augmenter: Augmenter | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                augment: bool | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Augments (when the split has an augmenter) on shuffled passes unless told otherwise."""
        augment = self.augmenter is not None and (shuffle if augment is None else augment)
        order, seeds = epoch_plan(len(self), shuffle, augment, generator)
        for position in torch.arange(len(self)).split(batch_size):
            index = order[position]
            if seeds is None:
                yield self.images[index], self.labels[index]
            else:
                yield self.augmenter(self.raw[index], seeds[position].tolist()), self.labels[index]


class _Stream(Dataset):
    """Decodes one image per key `(index, seed)` in a worker; seed -1 means no augmentation."""

    def __init__(self, source: Source, fmt: ImageFormat, augmenter: Augmenter | None):
        self.source, self.fmt, self.augmenter = source, fmt, augmenter

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        image, label = self.source.read(index)
        image = self.fmt.fit(image[None])
        if seed < 0 or self.augmenter is None:
            return self.fmt.normalise(image)[0], label
        return self.augmenter(to_uint8(image), [seed])[0], label


@dataclass(frozen=True)
class FolderSplit:
    """A split streamed from its source: workers decode, resize and normalise each image."""

    source: Source
    fmt: ImageFormat
    workers: int = 0
    augmenter: Augmenter | None = None
    labels: Tensor | None = field(init=False)  # None when only reading tells (torchvision)

    def __post_init__(self) -> None:
        labels = getattr(self.source, "labels", None)
        labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                augment: bool | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The same order and augmentation seeds as `TensorSplit.batches` would draw."""
        augment = self.augmenter is not None and (shuffle if augment is None else augment)
        order, seeds = epoch_plan(len(self), shuffle, augment, generator)
        seeds = torch.full_like(order, -1) if seeds is None else seeds
        keys = list(zip(order.tolist(), seeds.tolist(), strict=True))
        loader = DataLoader(_Stream(self.source, self.fmt, self.augmenter),
                            batch_size=batch_size, sampler=keys, num_workers=self.workers,
                            generator=torch.Generator())  # leaves the global RNG untouched
        yield from loader


Split = TensorSplit | FolderSplit


@dataclass(frozen=True)
class Task:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int


def in_memory(source: Source, fmt: ImageFormat, augmenter: Augmenter | None) -> TensorSplit:
    """Decode and prepare every image once; keep a uint8 copy only for augmentation."""
    if isinstance(source, ArraySource):
        chunks = [fmt.fit(c) for c in source.images.split(_CHUNK)]
        labels = source.labels
    else:
        items = [source.read(i) for i in range(len(source))]
        chunks = [fmt.fit(image[None]) for image, _ in items]
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    images = torch.cat(chunks)
    raw = to_uint8(images) if augmenter is not None else None
    return TensorSplit(fmt.normalise(images), labels, raw, augmenter)


def builtin_sources(config: TaskConfig, seed: int) -> Sources:
    """VTAB-1k style: train_size / val_size drawn by `seed`, the rest held out as test."""
    images, labels = builtin_arrays(config)
    num_classes = check_class_count(config, int(labels.max()) + 1, f"{config.name} labels")
    need = config.train_size + config.val_size
    if need >= len(labels):
        raise ValueError(f"task.train_size + task.val_size = {need} leaves no test images of "
                         f"the {len(labels)} in {config.name}; keep the sum below {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order[:config.train_size], order[config.train_size:need], order[need:]
    train, val, test = (ArraySource(images[i], labels[i]) for i in parts)
    return Sources(train, val, test, num_classes)


def read_sources(config: TaskConfig, mode: str, seed: int) -> Sources:
    if config.source == "builtin":
        return builtin_sources(config, seed)
    if config.source == "vtab":
        return read_vtab(config, mode)
    if config.source == "folder":
        return read_folder(config, mode)
    return read_torchvision(config, mode, seed)


def load_task(config: TaskConfig, *, img_size: int, in_chans: int, mean: tuple[float, ...],
              std: tuple[float, ...], seed: int = 0) -> Task:
    """Read, check and prepare a task for a backbone; every data error raises here, early.

    Raises `ValueError` naming the `task.*` field at fault, its value and what would be valid.
    """
    fmt = ImageFormat(img_size, in_chans, tuple(mean), tuple(std))
    sources = read_sources(config, "L" if in_chans == 1 else "RGB", seed)
    named = {"train": sources.train, "val": sources.val, "test": sources.test}
    for split, source in named.items():
        if len(source) == 0:
            raise ValueError(f"task: the {split} split of {config.source} task {config.name!r}"
                             f" (task.path={config.path}) is empty; give it at least one image")
    augmenter = Augmenter(fmt) if config.augment == "randaugment" else None
    total = sum(len(source) for source in named.values())
    if total <= IN_MEMORY_LIMIT:
        splits = [in_memory(source, fmt, augmenter if split == "train" else None)
                  for split, source in named.items()]
        for split in splits:
            check_labels_in_range(split.labels, sources.num_classes, config)
    else:
        for source in named.values():
            if isinstance(source, FileSource):
                check_headers(source.paths)
        splits = [FolderSplit(source, fmt, config.workers,
                              augmenter if split == "train" else None)
                  for split, source in named.items()]
    return Task(config.name, *splits, num_classes=sources.num_classes)


def check_labels_in_range(labels: Tensor, num_classes: int, config: TaskConfig) -> None:
    """Labels from a dataset (torchvision) are only known once read; check them then."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"task.num_classes: {config.name} has label {bad}, outside "
                         f"0..{num_classes - 1}; set task.num_classes to the real class count")
