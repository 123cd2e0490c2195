"""Adapter configurations: plain, frozen data, validated on construction.

One dataclass per method. They hold no tensors and know nothing about a model;
checks that need layer shapes happen in `karst.model` before the model changes.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import Any, ClassVar

RESCALE_MODES = ("channel", "scalar", "none")
INIT_MODES = ("gaussian", "kaiming")
FORWARD_MODES = ("auto", "dense", "factored")

#: Every attention and MLP projection of every transformer block (timm ViT, DeiT, Swin).
DEFAULT_TARGETS = (
    "*blocks.*.attn.qkv",
    "*blocks.*.attn.proj",
    "*blocks.*.mlp.fc1",
    "*blocks.*.mlp.fc2",
)


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r} is not valid; choose one of {list(choices)}.")


def _check_int(field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field_name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{field_name}={value} is not valid; it must be >= {minimum}.")


def _check_alpha(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"alpha must be a number, got {value!r} ({type(value).__name__}).")
    if not value > 0:
        raise ValueError(f"alpha={value} is not valid; it must be > 0.")


def _normalise_targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"targets={targets!r} is not valid; give one or more module-name patterns "
            f"(fnmatch style), e.g. {list(DEFAULT_TARGETS)}."
        )
    return targets


def _normalise_factor(factor: Any) -> tuple[int, int]:
    pair = (factor, factor) if isinstance(factor, int) and not isinstance(factor, bool) else factor
    try:
        f_out, f_in = pair
    except (TypeError, ValueError):
        raise TypeError(
            f"factor must be an int or a pair (f_out, f_in), got {factor!r}."
        ) from None
    _check_int("factor[0] (f_out)", f_out, 1)
    _check_int("factor[1] (f_in)", f_in, 1)
    return (f_out, f_in)


class _ConfigIO:
    """Round trip through plain dicts and JSON, for saved adapters and search spaces."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in data.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class KarstConfig(_ConfigIO):
    """KARST: N Kronecker kernels per target layer, plus re-scaling transmission.

    `ΔW = (alpha / rank) · Σ_i C_i ⊗ (A_i B_i)` with `C_i` of shape `factor`;
    `y = (1 + s1) ⊙ ((W0 + ΔW) x + b0) + s2`. LoKr is `num_kernels=1, rescale="none"`
    (see `lokr_config`).

    `forward` picks how a layer computes `ΔW x`: `"dense"` folds ΔW into the frozen
    weight (one matmul, parameter gradients computed in factored form), `"factored"`
    never builds ΔW, `"auto"` chooses per call by the measured rule in `karst.layer`.
    """

    method: ClassVar[str] = "karst"

    num_kernels: int = 2
    factor: int | tuple[int, int] = 8
    rank: int = 4
    alpha: float = 1.0
    rescale: str = "channel"
    init: str = "gaussian"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    forward: str = "auto"

    def __post_init__(self) -> None:
        _check_int("num_kernels", self.num_kernels, 1)
        object.__setattr__(self, "factor", _normalise_factor(self.factor))
        _check_int("rank", self.rank, 1)
        _check_alpha(self.alpha)
        _check_choice("rescale", self.rescale, RESCALE_MODES)
        _check_choice("init", self.init, INIT_MODES)
        _check_choice("forward", self.forward, FORWARD_MODES)
        object.__setattr__(self, "targets", _normalise_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraConfig(_ConfigIO):
    """LoRA baseline: `ΔW = (alpha / rank) · B A`, A Kaiming-uniform, B zero (as in peft)."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 1)
        _check_alpha(self.alpha)
        object.__setattr__(self, "targets", _normalise_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class RescaleConfig(_ConfigIO):
    """SSF-style baseline: only the re-scaling `(1 + s1) ⊙ y + s2` on each target."""

    method: ClassVar[str] = "ssf"

    rescale: str = "channel"
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        _check_choice("rescale", self.rescale, ("channel", "scalar"))
        object.__setattr__(self, "targets", _normalise_targets(self.targets))


@dataclass(frozen=True)
class LinearProbeConfig(_ConfigIO):
    """Baseline: frozen backbone, only the classifier head trains."""

    method: ClassVar[str] = "linear"


@dataclass(frozen=True)
class FullFinetuneConfig(_ConfigIO):
    """Baseline: every parameter trains."""

    method: ClassVar[str] = "full"


ADAPTER_CONFIG_TYPES = (KarstConfig, LoraConfig, RescaleConfig, LinearProbeConfig,
                        FullFinetuneConfig)
AdapterConfig = (
    KarstConfig | LoraConfig | RescaleConfig | LinearProbeConfig | FullFinetuneConfig
)


def lokr_config(
    *,
    factor: int | tuple[int, int] = 8,
    rank: int = 4,
    alpha: float = 1.0,
    init: str = "gaussian",
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    forward: str = "auto",
) -> KarstConfig:
    """LoKr (as in peft and LyCORIS) is KARST with one kernel and no re-scaling."""
    return KarstConfig(
        num_kernels=1, factor=factor, rank=rank, alpha=alpha, rescale="none",
        init=init, targets=targets, forward=forward,
    )


METHODS = {
    "karst": KarstConfig,
    "lokr": lokr_config,
    "lora": LoraConfig,
    "ssf": RescaleConfig,
    "linear": LinearProbeConfig,
    "full": FullFinetuneConfig,
}


def _field_names(factory: Any) -> list[str]:
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory)]
    return list(inspect.signature(factory).parameters)


def make_config(method: str, /, **fields: Any) -> AdapterConfig:
    """Build any adapter config by method name, e.g. `make_config("lora", rank=4)`."""
    _check_choice("method", method, tuple(METHODS))
    factory = METHODS[method]
    known = _field_names(factory)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"method={method!r} does not take field(s) {unknown}; its fields are {known}."
        )
    return factory(**fields)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of `to_dict`: the `method` key selects the config class."""
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise ValueError(f"adapter config {data!r} has no 'method'; one of {list(METHODS)}.")
    if isinstance(data.get("factor"), list):
        data["factor"] = tuple(data["factor"])
    return make_config(method, **data)
