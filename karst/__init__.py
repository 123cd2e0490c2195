"""KARST: multi-kernel Kronecker adaptation with re-scaling transmission (arXiv 2502.06779).

A small library with no Ray, Optuna or MLflow import: configure, apply to a timm (or any
`nn.Linear`) model, count, train, merge, save.
"""

from karst.config import (
    DEFAULT_TARGETS,
    METHODS,
    AdapterConfig,
    FullFinetuneConfig,
    KarstConfig,
    LinearProbeConfig,
    LoraConfig,
    RescaleConfig,
    config_from_dict,
    lokr_config,
    make_config,
)
from karst.functional import kronecker_delta
from karst.io import load_adapter, read_adapter_config, save_adapter
from karst.layer import AdaptedLinear, KroneckerDelta, LowRankDelta, Rescale
from karst.model import (
    adapter_config,
    apply_karst,
    classifier_heads,
    find_targets,
    merge_karst,
    param_count,
    trainable_parameters,
)

__all__ = [
    "DEFAULT_TARGETS",
    "METHODS",
    "AdaptedLinear",
    "AdapterConfig",
    "FullFinetuneConfig",
    "KarstConfig",
    "KroneckerDelta",
    "LinearProbeConfig",
    "LoraConfig",
    "LowRankDelta",
    "Rescale",
    "RescaleConfig",
    "adapter_config",
    "apply_karst",
    "classifier_heads",
    "config_from_dict",
    "find_targets",
    "kronecker_delta",
    "load_adapter",
    "lokr_config",
    "make_config",
    "merge_karst",
    "param_count",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameters",
]
