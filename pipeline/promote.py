"""Promote one trial of a finished search: find it, rebuild it, merge it, gate the merge.

A trial is chosen by a named policy over the search's front (`pipeline.policy`) or by
number; its backbone and task are rebuilt from the trial config and its trained adapter is
read from the trial's MLflow run. `karst.merge_karst` folds the adapter into the weights,
and the gate compares the merged model with the adapted one on a probe batch before
anything reaches the registry (`pipeline.registry`): the largest logit difference, top-1
agreement, and the merged state dict against the vanilla architecture's.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import karst
from pipeline import tracking
from pipeline.backbones import create_model_skeleton
from pipeline.config import ConfigError, TrialConfig, apply_value, flatten, validate_trial_config
from pipeline.front import COMPLETE, TrialPoint
from pipeline.policy import parse_policy, select
from pipeline.search import find_search_run, load_front
from pipeline.train import accuracy
from pipeline.trial import prepare_trial

ADAPTER_FILE = "adapter.safetensors"


class GateConfig(BaseModel):
    """How close the merged model must stay to the adapted one to be promoted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(1e-4, ge=0)  # max |Δlogit| on the probe batch
    min_agreement: float = Field(1.0, ge=0, le=1)  # top-1 agreement on the probe batch
    probe_size: int = Field(64, ge=2)  # ≥ 2: the exported model keeps a dynamic batch size


@dataclass(frozen=True)
class Candidate:
    """The trial to promote, where it lives in MLflow, and why it was chosen."""

    search: str
    search_run_id: str
    trial_run_id: str
    point: TrialPoint
    policy: str  # "knee", "budget:50000", ... or "trial:7" for an explicit trial


@dataclass(frozen=True)
class GateReport:
    max_abs_logit_diff: float
    top1_agreement: float
    probe_size: int
    missing_keys: tuple[str, ...]  # of the vanilla architecture: absent or mis-shaped if merged
    unexpected_keys: tuple[str, ...]  # in the merged model, not in the vanilla architecture
    config: GateConfig

    @property
    def keys_match(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys)

    def failures(self) -> list[str]:
        """Why the gate refuses, one line per broken rule; empty when it passes."""
        c, out = self.config, []
        if not self.max_abs_logit_diff <= c.tolerance:  # NaN fails too
            out.append(f"max |Δlogit| {self.max_abs_logit_diff:.3g} > tolerance {c.tolerance:g}")
        if self.top1_agreement < c.min_agreement:
            out.append(f"top-1 agreement {self.top1_agreement:.2%} < {c.min_agreement:.2%}")
        if not self.keys_match:
            out.append(f"state dict differs from the vanilla architecture: missing or "
                       f"mis-shaped {list(self.missing_keys[:5])}, unexpected "
                       f"{list(self.unexpected_keys[:5])}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()


@dataclass(frozen=True)
class MergedTrial:
    """A candidate merged into a plain model, with the gate's verdict and its test accuracy."""

    candidate: Candidate
    model: nn.Module  # the plain timm model, eval mode
    probe: Tensor  # the probe images, on the CPU
    gate: GateReport
    test_accuracy: float  # of the merged model
    num_classes: int


class GateFailed(RuntimeError):
    """The merged model is not equivalent to the adapted one; nothing was registered."""

    def __init__(self, merged: MergedTrial) -> None:
        self.merged = merged
        super().__init__("merge gate failed: " + "; ".join(merged.gate.failures()))


# --------------------------------------------------------------------------- choose


def choose(search: str, *, policy: str | None = None, trial: int | None = None) -> Candidate:
    """The trial of `search` that `policy` picks on its front, or trial number `trial`.

    Raises `ValueError` for an unknown search or trial, a policy that selects nothing, or a
    trial that did not complete (it has no trained adapter).
    """
    if (policy is None) == (trial is None):
        raise ValueError("give either --policy or --trial, not both and not neither")
    parsed = parse_policy(policy) if policy is not None else None
    search_run = find_search_run(search)
    front = load_front(search)
    if parsed is not None:
        point = select(front, parsed)
        run = find_trial_run(search, search_run.info.run_id, point.trial)
    else:
        run = find_trial_run(search, search_run.info.run_id, trial)
        point = next((p for p in front if p.trial == trial), None) or point_from_run(run)
    return Candidate(search, search_run.info.run_id, run.info.run_id, point,
                     str(parsed) if parsed else f"trial:{trial}")


def find_trial_run(search: str, search_run_id: str, trial: int) -> Any:
    """The complete child run of trial `trial`; `ValueError` listing the promotable ones."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{search_run_id}'")
    runs = [r for r in runs if r.data.tags.get("karst.kind") == "trial"]
    complete = sorted({int(r.data.tags["karst.trial_number"]) for r in runs
                       if r.data.tags.get("karst.state") == COMPLETE})
    mine = [r for r in runs if r.data.tags.get("karst.trial_number") == str(trial)]
    if not mine:
        raise ValueError(f"--trial {trial}: search {search!r} has no trial {trial}; its "
                         f"complete trials are {complete}")
    done = [r for r in mine if r.data.tags.get("karst.state") == COMPLETE]
    if not done:
        state = mine[0].data.tags.get("karst.state", "running or interrupted")
        raise ValueError(f"--trial {trial}: trial {trial} of search {search!r} is {state}, so "
                         f"it has no trained adapter; promote a complete trial: {complete}")
    return max(done, key=lambda r: r.info.start_time)


def point_from_run(run: Any) -> TrialPoint:
    """A trial off the front, as the front would show it, from its child run."""
    metrics = run.data.metrics
    return TrialPoint(trial=int(run.data.tags["karst.trial_number"]),
                      val_accuracy=float(metrics["val_accuracy"]),
                      params=int(metrics["params"]), state=COMPLETE,
                      test_accuracy=metrics.get("test_accuracy"),
                      config=config_from_params(run.data.params).model_dump(mode="json"))


def config_from_params(params: dict[str, str]) -> TrialConfig:
    """Invert `pipeline.config.flatten`: the trial config a run logged as params.

    Values were logged as `str()` of JSON values; they are read back as YAML (`None` as
    null), and the result must flatten back to exactly the logged params, so a value cut
    for length or read back as other text is an error, never a guess. What no text can
    tell apart stays a limit: a string "1" under `backbone.kwargs` comes back as the int 1.
    Front members need none of this: the front stores their configs whole.
    """
    data: dict[str, Any] = {}
    for key, text in params.items():
        if text.endswith("...") and len(text) >= tracking._MAX_PARAM_CHARS:
            raise ValueError(f"the trial's logged param {key!r} was cut for length, so its "
                             "config cannot be rebuilt; promote a front member instead")
        apply_value(data, key, None if text == "None" else yaml.safe_load(text))
    try:
        config = validate_trial_config(data, source="the trial's logged params")
    except ConfigError as err:
        raise ValueError(str(err)) from None
    differing = sorted(k for k, v in flatten(config).items() if params.get(k) != v)
    if differing:
        raise ValueError(f"the trial config cannot be rebuilt from its MLflow params (they "
                         f"differ at {differing[:5]}); promote a front member instead")
    return config


# --------------------------------------------------------------------------- merge and gate


def merge_and_gate(candidate: Candidate, gate_config: GateConfig | None = None,
                   device: torch.device | str = "cpu") -> MergedTrial:
    """Rebuild the trained trial, merge it, gate the merge, test the merged model."""
    gate_config = gate_config or GateConfig()
    config = TrialConfig.model_validate(candidate.point.config)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = download_adapter(candidate.trial_run_id, tmp)  # fails before building
        prepared = prepare_trial(config, device)
        adapted = karst.load_adapter(prepared.model, adapter).eval()
    merged = karst.merge_karst(copy.deepcopy(adapted)).eval()
    use_factored_forward(adapted)
    num_classes = prepared.task.num_classes
    probe = next(iter(prepared.task.val.batches(gate_config.probe_size)))[0]
    vanilla = vanilla_state_shapes(config, num_classes)
    gate = run_gate(adapted, merged, probe.to(device), vanilla, gate_config)
    test_accuracy = accuracy(merged, prepared.task.test)
    return MergedTrial(candidate, merged.cpu(), probe, gate, test_accuracy, num_classes)


def download_adapter(run_id: str, directory: str) -> str:
    """The trial's `adapter.safetensors` (adapter, re-scaling, head), downloaded."""
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ADAPTER_FILE,
                                                   dst_path=directory)
    except Exception as err:  # MLflow raises several types for a missing artifact
        raise ValueError(f"trial run {run_id} has no {ADAPTER_FILE} artifact ({err}); the "
                         "trial's upload failed or the artifact was deleted: promote another "
                         "trial") from None


def use_factored_forward(adapted: nn.Module) -> None:
    """Make every adapted layer compute `ΔW x` without building ΔW.

    The dense forward folds ΔW and the re-scaling into the weight exactly as the merge
    does, so against it the gate would compare one computation with itself; the factored
    form is an independent computation of the same function.
    """
    for layer in adapted.modules():
        if isinstance(layer, karst.AdaptedLinear):
            layer.forward_mode = "factored"


def vanilla_state_shapes(config: TrialConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key → shape of the plain architecture with this head, built on the `meta` device."""
    kwargs = {**config.backbone.kwargs, "num_classes": num_classes}
    skeleton = create_model_skeleton(config.backbone.model_copy(update={"kwargs": kwargs}))
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


@torch.no_grad()
def run_gate(adapted: nn.Module, merged: nn.Module, probe: Tensor,
             vanilla: dict[str, tuple[int, ...]], config: GateConfig) -> GateReport:
    """Compare both models on `probe` in float32, and the merged keys and shapes to `vanilla`."""
    before, after = adapted(probe).float(), merged(probe).float()
    state = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    missing = tuple(k for k in vanilla if state.get(k) != vanilla[k])
    unexpected = tuple(k for k in state if k not in vanilla)
    return GateReport(max_abs_logit_diff=(after - before).abs().max().item(),
                      top1_agreement=(after.argmax(-1) == before.argmax(-1)).float().mean().item(),
                      probe_size=len(probe), missing_keys=missing, unexpected_keys=unexpected,
                      config=config)
