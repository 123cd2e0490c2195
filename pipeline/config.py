"""The trial config: one validated pydantic model for everything a fine-tune needs.

A YAML file maps onto `TrialConfig` field for field; unknown keys are errors that name the
key and list the valid ones. The adapter section becomes a `karst` config, which validates
itself (shapes are checked later, against the backbone, before training starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
)

import karst

BUILTIN_BACKBONE = "karst_vit_fmnist"
BUILTIN_TASKS = ("mnist", "digits")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Section):
    """Any timm model name; weights from timm (`pretrained`, online) or a local `checkpoint`."""

    name: str = BUILTIN_BACKBONE
    pretrained: bool = True
    checkpoint: Path | None = None
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TaskConfig(_Section):
    """Where the images come from.

    `source`: `builtin` (`name` one of the built-in tasks), `vtab` (a VTAB-1k task folder
    with `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`), `folder` (an
    ImageFolder tree with `train/`, `val/`, `test/`), or `torchvision` (`name` a
    torchvision dataset class; downloads when online).

    `train_size` / `val_size` apply to `builtin` (the rest is the test split) and
    `torchvision` (drawn from its train split by the trial seed); `vtab` and `folder` tasks
    bring their own splits. `trainval` trains a VTAB task on `train800val200.txt` instead of
    `train800.txt` (final runs, after the search). `augment` applies to the train split only.
    """

    source: Literal["builtin", "vtab", "folder", "torchvision"] = "builtin"
    name: str = "mnist"
    path: Path | None = None
    num_classes: int | None = Field(None, ge=2)
    train_size: int = Field(800, ge=1)
    val_size: int = Field(200, ge=1)
    trainval: bool = False
    augment: Literal["none", "randaugment"] = "none"
    workers: int = Field(2, ge=0)


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0)


def _parse_adapter(value: Any) -> karst.AdapterConfig:
    if isinstance(value, karst.config.ADAPTER_CONFIG_TYPES):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with a 'method' key (one of {list(karst.METHODS)})")
    try:
        return karst.config_from_dict(value)
    except TypeError as err:  # karst raises TypeError for wrong types; pydantic wants ValueError
        raise ValueError(str(err)) from None


#: The adapter section is the `karst` config itself (`method` picks the class), so its
#: fields, defaults and error messages live in one place: `karst.config`.
AdapterField = Annotated[
    Any,
    BeforeValidator(_parse_adapter),
    PlainSerializer(lambda config: config.to_dict(), return_type=dict),
]


class TrialConfig(_Section):
    """One fine-tune: backbone, task, adapter, optimiser and schedule."""

    backbone: BackboneConfig = BackboneConfig()
    task: TaskConfig = TaskConfig()
    adapter: AdapterField = karst.KarstConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class ConfigError(ValueError):
    """A config file or override that does not validate; the message lists every problem."""


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping, or a `ConfigError` saying what is wrong with it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_trial_config(path: str | Path, overrides: list[str] = ()) -> TrialConfig:
    """Read a YAML trial config and apply `key.sub=value` overrides (values parsed as YAML)."""
    data = read_yaml_mapping(path)
    for override in overrides:
        apply_override(data, override)
    return validate_trial_config(data, source=str(path))


def validate_trial_config(data: dict[str, Any], source: str = "config") -> TrialConfig:
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                             f" (got {e.get('input')!r})" for e in err.errors())
        raise ConfigError(f"{source} is not a valid trial config:\n{problems}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """`optim.lr=3e-3` sets `data["optim"]["lr"] = 0.003`, creating sections as needed."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value, e.g. optim.lr=3e-3")
    apply_value(data, key.strip(), yaml.safe_load(raw))


def apply_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (`optim.lr`) in nested `data`, creating sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
    node[leaf] = value


def flatten(config: BaseModel) -> dict[str, str]:
    """`{"optim.lr": "0.001", ...}`: the config as flat, string-valued params for tracking."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat
