"""Backbones: any timm model, its weights, and the built-in `karst_vit_fmnist`.

`create_backbone` turns a `BackboneConfig` into a timm model with its weights loaded and
checked, before any training: a checkpoint that does not fit the architecture fails here
with a `ValueError` naming `backbone.checkpoint`, not as a silent random init or a shape
error three layers into the first step. Only the classifier head may differ, because the
trial resets it for its task anyway.

Importing this module registers `karst_vit_fmnist` in timm's registry: a 0.46 M-parameter
ViT pretrained by this project on Fashion-MNIST (`karst pretrain`, docs/backbone.md), whose
weights ship in `pipeline/weights/`, so the default trial runs offline with a real,
pretrained backbone.
"""

from __future__ import annotations

import difflib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from pipeline.config import BUILTIN_BACKBONE, BackboneConfig

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_WEIGHTS = WEIGHTS_DIR / f"{BUILTIN_BACKBONE}.safetensors"
#: Fashion-MNIST train-set pixel statistics (pixels scaled to [0, 1]).
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
#: Widths 96 / 288 / 384 divide by every Kronecker factor 2…32 the adapter search tries.
BUILTIN_ARCH: dict[str, Any] = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96,
                                    depth=4, num_heads=3, mlp_ratio=4.0)
CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".safetensors")

# timm's `register_model` reads the pretrained cfg from this module's `default_cfgs`.
default_cfgs = {
    BUILTIN_BACKBONE: dict(
        file=str(BUILTIN_WEIGHTS), num_classes=10, input_size=(1, 28, 28), pool_size=None,
        crop_pct=1.0, interpolation="bilinear", fixed_input_size=True, mean=FMNIST_MEAN,
        std=FMNIST_STD, first_conv="patch_embed.proj", classifier="head",
        license="apache-2.0", description="ViT pretrained on Fashion-MNIST by karst-search",
    ),
}


@register_model
def karst_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The built-in backbone: ViT, 28×28 grey inputs, 4×4 patches, dim 96, depth 4, 3 heads."""
    return build_model_with_cfg(VisionTransformer, BUILTIN_BACKBONE, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                **{**BUILTIN_ARCH, **kwargs})


# --------------------------------------------------------------------------- create


def create_backbone(config: BackboneConfig) -> nn.Module:
    """The timm model `config` names, with weights: `checkpoint` if set, else `pretrained`.

    A checkpoint wins over `pretrained` (the model is then built without downloading
    anything). Problems raise `ValueError` naming the config field, the value and the fix.
    """
    name = _check_name(config.name)
    kwargs = dict(config.kwargs)
    if config.drop_path > 0:
        if "drop_path_rate" in kwargs:
            raise ValueError("backbone.kwargs.drop_path_rate duplicates backbone.drop_path; "
                             "set only backbone.drop_path")
        kwargs["drop_path_rate"] = config.drop_path
    from_timm = config.pretrained and config.checkpoint is None
    if from_timm and timm.models.get_arch_name(name) == BUILTIN_BACKBONE:
        _require_builtin_weights()
    model = _build(name, from_timm, kwargs)
    if config.checkpoint is not None:
        report = load_checkpoint(model, config.checkpoint)
        logger.info("%s", report.summary())
    return model


def create_model_skeleton(config: BackboneConfig) -> nn.Module:
    """The architecture alone, on the `meta` device: layer shapes for counting and checking
    adapter configs (a search space's dry run, its samples) without allocating weights."""
    name = _check_name(config.name)
    with torch.device("meta"):
        return _build(name, False, dict(config.kwargs))


def _check_name(name: str) -> str:
    """Fail on a misspelt model name with the closest timm names, not timm's bare error."""
    if name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match."
    raise ValueError(f"backbone.name: {name!r} is not a timm model; {hint} "
                     "(`timm.list_models('*vit*')` lists the names)")


def _require_builtin_weights() -> None:
    if not BUILTIN_WEIGHTS.is_file():
        raise ValueError(f"backbone.pretrained: the weights of {BUILTIN_BACKBONE!r} are missing "
                         f"({BUILTIN_WEIGHTS}); run `karst pretrain` to rebuild them, or set "
                         "backbone.pretrained=false")


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """`timm.create_model`, its exceptions turned into errors that name the config field."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as err:
        raise ValueError(f"backbone.kwargs: {name!r} does not accept {kwargs}: {err}; "
                         "fix or remove the offending key") from err
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise ValueError(f"backbone.kwargs: cannot build {name!r} with {kwargs}: {err}") \
                from err
        raise ValueError(f"backbone.pretrained: cannot load timm's published weights for "
                         f"{name!r} ({type(err).__name__}: {err}); go online once so timm "
                         "caches them, set backbone.checkpoint to a local file, or set "
                         "backbone.pretrained=false") from err


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointReport:
    """What loading a checkpoint left out; everything else was loaded and shape-checked."""

    path: Path
    missing: tuple[str, ...] = ()     # head keys the file lacks: left at their init
    unexpected: tuple[str, ...] = ()  # head keys the model lacks: ignored
    dropped: tuple[str, ...] = ()     # head tensors of another shape: ignored

    def summary(self) -> str:
        parts = [f"loaded {self.path}"]
        for label, keys in (("missing head keys", self.missing),
                            ("unexpected head keys", self.unexpected),
                            ("dropped mis-shaped head tensors", self.dropped)):
            if keys:
                parts.append(f"{label}: {', '.join(keys)}")
        return "; ".join(parts)


def load_checkpoint(model: nn.Module, path: str | Path) -> CheckpointReport:
    """Load a local checkpoint into `model`, strictly except for the classifier head.

    `.npz` goes through timm's own loader for the original Google ViT release format;
    `.pth` / `.pt` / `.safetensors` through the model module's `checkpoint_filter_fn`
    (timm-format checkpoints of another resolution get their position embedding resized).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone.checkpoint: {path} is not a file; point it at a "
                         f"{'/'.join(CHECKPOINT_SUFFIXES)} checkpoint")
    if path.suffix.lower() == ".npz":
        return _load_npz(model, path)
    state = _filter_state_dict(model, read_state_dict(path), path)
    return _load_checked(model, state, path)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a `.pth` / `.pt` (bare, or under "state_dict" / "model") or `.safetensors`."""
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"backbone.checkpoint: {path} has suffix {suffix!r}; use one of "
                         f"{', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            state: Any = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors and I/O errors all mean "unreadable"
        raise ValueError(f"backbone.checkpoint: cannot read {path} as {suffix} "
                         f"({type(err).__name__}: {err}); re-export it with torch.save(model."
                         "state_dict(), ...) or safetensors") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone.checkpoint: {path} holds no state dict (a mapping of names "
                         "to tensors, bare or under 'state_dict' / 'model')")
    return timm.models.clean_state_dict(state)  # drops a DataParallel "module." prefix


def _filter_state_dict(model: nn.Module, state: dict[str, Tensor],
                       path: Path) -> dict[str, Tensor]:
    """Run the model module's `checkpoint_filter_fn`, as timm does for its own weights."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        try:
            return filter_fn(state, model)
        except TypeError:  # older filters take the state dict only
            return filter_fn(state)
    except Exception as err:
        raise ValueError(f"backbone.checkpoint: timm's checkpoint filter for "
                         f"{type(model).__name__} failed on {path} ({type(err).__name__}: "
                         f"{err}); the file is probably for another architecture") from err


def _load_checked(model: nn.Module, state: dict[str, Tensor], path: Path) -> CheckpointReport:
    """Load `state`; any difference outside the head is a `ValueError` listing the keys."""
    expected = model.state_dict()
    heads = head_prefixes(model)
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = ([f"{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in "
                 f"the model" for k in mismatched]
                + [f"missing {k} {tuple(expected[k].shape)}" for k in missing]
                + [f"unexpected {k} {tuple(state[k].shape)}" for k in unexpected])
    keys = mismatched + missing + unexpected
    problems = [p for p, k in zip(problems, keys, strict=True) if not k.startswith(heads)]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"backbone.checkpoint: {path} does not fit {type(model).__name__}: "
                         f"{'; '.join(problems[:5])}{more}. Only the classifier head may "
                         "differ; use a checkpoint of this architecture, or set "
                         "backbone.name / backbone.kwargs to the checkpoint's")
    model.load_state_dict({k: v for k, v in state.items()
                           if k in expected and k not in mismatched}, strict=False)
    return CheckpointReport(path, tuple(missing), tuple(unexpected), tuple(mismatched))


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """`("head.",)` for a ViT: key prefixes of the classifier(s) `get_classifier` returns."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = classifier if isinstance(classifier, tuple | list) else (classifier,)
    names = [name for name, module in model.named_modules()
             if name and any(module is head for head in heads if head is not None)]
    return tuple(f"{name}." for name in names)


def _load_npz(model: nn.Module, path: Path) -> CheckpointReport:
    """Google's ViT `.npz` release format, read by timm's own `load_pretrained`."""
    loader = getattr(model, "load_pretrained", None)
    if loader is None:
        raise ValueError(f"backbone.checkpoint: {path} is a Google-format .npz, which only "
                         f"timm's ViT family reads, not {type(model).__name__}; convert it to "
                         ".safetensors / .pth")
    try:
        loader(str(path))
    except KeyError as err:  # numpy: "<key> is not a file in the archive"
        key = str(err.args[0]).removesuffix(" is not a file in the archive")
        raise ValueError(f"backbone.checkpoint: {path} lacks {key!r}, which "
                         f"{type(model).__name__} needs; use a checkpoint of this architecture "
                         "or set backbone.kwargs (depth, embed_dim, ...) to the checkpoint's") \
            from err
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"backbone.checkpoint: {path} does not fit {type(model).__name__} "
                         f"({err}); use a checkpoint of this architecture") from err
    return CheckpointReport(path)  # timm loads the head only where its shape matches


# --------------------------------------------------------------------------- data config


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """`img_size`, `in_chans`, `mean`, `std` the task must feed `model`, for `load_task`.

    The size and channel count come from the model's modules (they reflect `kwargs` such as
    `img_size` or `in_chans`, which a pretrained cfg does not); mean and std from its
    pretrained cfg, averaged to one channel or repeated to match `in_chans`.
    """
    cfg = timm.data.resolve_model_data_config(model)
    in_chans = _in_chans(model, cfg)
    return {"img_size": _img_size(model, cfg), "in_chans": in_chans,
            "mean": _per_channel(cfg["mean"], in_chans),
            "std": _per_channel(cfg["std"], in_chans)}


def _img_size(model: nn.Module, cfg: dict[str, Any]) -> int:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = tuple(cfg["input_size"][1:]) if size is None else size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"backbone.kwargs: input size {height}x{width} is not square; tasks "
                         "are resized to square images, so set backbone.kwargs.img_size to "
                         "one int")
    return int(height)


def _in_chans(model: nn.Module, cfg: dict[str, Any]) -> int:
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    for name in (first,) if isinstance(first, str) else tuple(first or ()):
        try:
            return int(model.get_submodule(name).in_channels)
        except AttributeError:
            continue
    return int(cfg["input_size"][0])


def _per_channel(values: Any, in_chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return (sum(values) / len(values),) * in_chans
