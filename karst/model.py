"""Apply an adapter config to a model, count its parameters, merge it back.

Every check runs on the plan (which layers, which shapes) before a single module or
tensor is created, so a bad config never leaves a half-adapted model behind.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from karst.config import (
    ADAPTER_CONFIG_TYPES,
    AdapterConfig,
    FullFinetuneConfig,
    KarstConfig,
    LoraConfig,
    RescaleConfig,
)
from karst.layer import (
    AdaptedLinear,
    KroneckerDelta,
    LowRankDelta,
    NoDelta,
    NoRescale,
    Rescale,
)

CONFIG_ATTR = "karst_config"


@dataclass(frozen=True)
class Target:
    """One `nn.Linear` the config adapts: its qualified name and shape."""

    name: str
    d_out: int
    d_in: int
    has_bias: bool


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The head(s) through timm's interface (`get_classifier`; distilled DeiT has two).

    Empty for models without that interface: all of their parameters count as backbone.
    """
    get_classifier = getattr(model, "get_classifier", None)
    heads = get_classifier() if callable(get_classifier) else ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [h for h in heads if isinstance(h, nn.Module)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[Target]:
    """The layers `config` adapts, validated against its factor and rank.

    Raises `ValueError` naming the pattern, module, shape and valid values on any mismatch.
    """
    if _is_adapted(model):
        raise ValueError(
            "this model already carries an adapter (apply_karst was called on it before); "
            "create a fresh model, or merge_karst() this one first."
        )
    patterns = getattr(config, "targets", ())
    if not patterns:
        return []
    heads = classifier_heads(model)
    head_names = {n for n, m in model.named_modules() if any(m is h for h in heads)}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets: dict[str, Target] = {}
    for pattern in patterns:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"targets pattern {pattern!r} matches no nn.Linear module. "
                f"Some linear modules of this model: {list(linears)[:8]}."
            )
        for name in hits:
            if name in head_names:
                raise ValueError(
                    f"targets pattern {pattern!r} matches the classifier head {name!r}; the "
                    "head always trains in full, so leave it out of targets."
                )
            layer = linears[name]
            targets[name] = Target(name, layer.out_features, layer.in_features,
                                   layer.bias is not None)
    order = {name: i for i, name in enumerate(linears)}
    found = sorted(targets.values(), key=lambda t: order[t.name])
    _check_shapes(found, config)
    return found


def _check_shapes(targets: list[Target], config: AdapterConfig) -> None:
    if isinstance(config, KarstConfig):
        f_out, f_in = config.factor
        for t in targets:
            if t.d_out % f_out or t.d_in % f_in:
                raise ValueError(_factor_message(t, targets, config.factor))
            _check_rank(t, config.rank, t.d_out // f_out, t.d_in // f_in, "d/f")
    elif isinstance(config, LoraConfig):
        for t in targets:
            _check_rank(t, config.rank, t.d_out, t.d_in, "d")


def common_factors(targets: list[Target]) -> tuple[list[int], list[int], list[int]]:
    """Factors valid for every target: f_out values, f_in values, and those valid as one int."""
    outs = set.intersection(*(set(_divisors(t.d_out)) for t in targets))
    ins = set.intersection(*(set(_divisors(t.d_in)) for t in targets))
    return sorted(outs), sorted(ins), sorted(outs & ins)


def _factor_message(target: Target, targets: list[Target], factor: tuple[int, int]) -> str:
    outs, ins, common = common_factors(targets)
    return (
        f"factor={factor} does not divide target {target.name!r} of shape "
        f"(out={target.d_out}, in={target.d_in}): f_out must divide {target.d_out} "
        f"(valid: {_divisors(target.d_out)}) and f_in must divide {target.d_in} "
        f"(valid: {_divisors(target.d_in)}). Factors valid for every target: "
        f"f_out in {outs}, f_in in {ins}; as one int: {common}."
    )


def _check_rank(target: Target, rank: int, rows: int, cols: int, what: str) -> None:
    limit = min(rows, cols)
    if rank >= limit:
        raise ValueError(
            f"rank={rank} is not below {what}={limit} for target {target.name!r} of shape "
            f"(out={target.d_out}, in={target.d_in}); choose rank in 1..{limit - 1}"
            + (" or a smaller factor." if what == "d/f" else ".")
        )


def _is_adapted(model: nn.Module) -> bool:
    return hasattr(model, CONFIG_ATTR) or any(
        isinstance(m, AdaptedLinear) for m in model.modules()
    )


def _head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for head in classifier_heads(model) for p in head.parameters()}


def param_count(model: nn.Module, config: AdapterConfig) -> int:
    """Trainable parameters `config` adds to `model`, head excluded, in closed form.

    Reads layer shapes only (no tensor is allocated, so a model on the `meta` device
    works); validates exactly as `apply_karst` does.
    """
    targets = find_targets(model, config)
    if isinstance(config, FullFinetuneConfig):
        head = _head_parameter_ids(model)
        return sum(p.numel() for p in model.parameters() if id(p) not in head)
    return sum(_layer_param_count(t, config) for t in targets)


def _layer_param_count(t: Target, config: AdapterConfig) -> int:
    if isinstance(config, KarstConfig):
        return (KroneckerDelta.num_parameters(t.d_out, t.d_in, config.num_kernels,
                                              config.factor, config.rank)
                + Rescale.num_parameters(t.d_out, config.rescale, t.has_bias))
    if isinstance(config, LoraConfig):
        return LowRankDelta.num_parameters(t.d_out, t.d_in, config.rank)
    if isinstance(config, RescaleConfig):
        return Rescale.num_parameters(t.d_out, config.rescale, t.has_bias)
    return 0


def apply_karst(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze the backbone, wrap every target `nn.Linear`, keep the head trainable.

    Works in place and returns `model`. Every method of `karst.config` goes through here.
    """
    if not isinstance(config, ADAPTER_CONFIG_TYPES):
        raise TypeError(f"config must be an adapter config from karst.config, got {config!r}.")
    targets = find_targets(model, config)
    full = isinstance(config, FullFinetuneConfig)
    for p in model.parameters():
        p.requires_grad_(full)
    for head in classifier_heads(model):
        head.requires_grad_(True)
    for t in targets:
        parent_name, _, child = t.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _wrap(getattr(parent, child), config))
    setattr(model, CONFIG_ATTR, config)
    return model


def _wrap(base: nn.Linear, config: AdapterConfig) -> AdaptedLinear:
    d_out, d_in, device = base.out_features, base.in_features, base.weight.device
    has_bias = base.bias is not None
    rescale_mode = getattr(config, "rescale", "none")
    rescale: nn.Module = (NoRescale() if rescale_mode == "none"
                          else Rescale(d_out, mode=rescale_mode, has_bias=has_bias, device=device))
    delta: nn.Module
    if isinstance(config, KarstConfig):
        delta = KroneckerDelta(d_out, d_in, num_kernels=config.num_kernels, factor=config.factor,
                               rank=config.rank, scale=config.scale, init=config.init,
                               device=device)
    elif isinstance(config, LoraConfig):
        delta = LowRankDelta(d_out, d_in, rank=config.rank, scale=config.scale, device=device)
    else:
        delta = NoDelta()
    return AdaptedLinear(base, delta, rescale, forward_mode=getattr(config, "forward", "auto"))


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The config `apply_karst` applied to `model`."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model carries no adapter; call apply_karst(model, config) first.")
    return config


def merge_karst(model: nn.Module) -> nn.Module:
    """Fold every adapter and re-scaling into its layer and unwrap it, in place.

    The result is the plain architecture again: its state dict loads with `strict=True`
    into a freshly created model of the same name, with no KARST module or key left.
    """
    adapter_config(model)
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    merged = {}
    for name, layer in wrapped:  # compute every layer before changing any
        try:
            merged[name] = layer.merged_weights()
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    for name, layer in wrapped:
        weight, bias = merged[name]
        base = layer.base_layer
        with torch.no_grad():
            base.weight.copy_(weight.to(base.weight.dtype))
            if bias is not None:
                base.bias.copy_(bias.to(base.bias.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    delattr(model, CONFIG_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of parameters that receive gradients: `adapter` (head excluded) and `head`."""
    head = _head_parameter_ids(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_head = sum(p.numel() for p in trainable if id(p) in head)
    return {"adapter": sum(p.numel() for p in trainable) - in_head, "head": in_head}
