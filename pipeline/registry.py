"""The registry end of a promotion: log the merged model, check it, register, alias; serve it.

The merged model is logged with `serialization_format="pt2"` (torch.export), MLflow 3's
default: the registry holds a traced graph of the plain timm architecture with its weights
under timm's key names and no pickled classes, so loading or serving it needs torch and
MLflow only (no `karst`, no `pipeline`), and MLflow's refusal to unpickle models does not
get in the way. The timm name, head size and input format are in the model's metadata for
anyone who wants the timm class back (docs/promote.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.backbones import backbone_data_config
from pipeline.promote import GateFailed, MergedTrial

DEFAULT_ALIAS = "champion"
MODEL_ARTIFACT = "model"
#: What the logged model needs at load time, pinned to what it was built and checked with.
RUNTIME_PACKAGES = ("torch", "torchvision", "timm")


class ExportMismatch(RuntimeError):
    """The model MLflow stored does not reproduce the merged one; nothing was registered."""


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    alias: str
    logged_model_uri: str  # the logged model (models:/<model id>), attached to the search run
    export_max_abs_diff: float  # stored model vs in-process merged model, on the probe batch

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


def check_registry_names(model_name: str, alias: str) -> None:
    """Apply MLflow's own rules for model names and aliases before any work starts.

    They are the rules its stores enforce on registration (private helpers of
    `mlflow.utils.validation`); checking first keeps a refused name from leaving a logged
    model behind.
    """
    from mlflow.utils import validation

    checks = (("--model-name", model_name, (validation._validate_model_name,)),
              ("--alias", alias, (validation._validate_model_alias_name,
                                  validation._validate_model_alias_name_reserved)))
    for option, value, rules in checks:
        try:
            for rule in rules:
                rule(value)
        except MlflowException as err:
            raise ValueError(f"{option} {value!r}: MLflow refuses it ({err.message})") from None


def register(merged: MergedTrial, *, model_name: str, alias: str = DEFAULT_ALIAS) -> Registration:
    """Log `merged` on its search's run, check the stored copy, register it, move `alias`.

    A new version is added each time; earlier versions stay registered, and only `alias`
    moves. Refuses (`GateFailed`) a merge whose gate did not pass.
    """
    if not merged.gate.passed:
        raise GateFailed(merged)
    check_registry_names(model_name, alias)
    info = log_merged_model(merged)
    drift = stored_model_drift(info.model_uri, merged)
    if not drift <= merged.gate.config.tolerance:
        raise ExportMismatch(f"the model MLflow stored ({info.model_uri}) differs from the "
                             f"merged model by max |Δlogit| {drift:.3g} > tolerance "
                             f"{merged.gate.config.tolerance:g}; nothing was registered")
    version = mlflow.register_model(info.model_uri, model_name,
                                    tags=version_tags(merged, drift, alias))
    client = mlflow.MlflowClient()
    client.update_model_version(model_name, version.version, description=_describe(merged))
    client.set_registered_model_alias(model_name, alias, version.version)
    return Registration(model_name, str(version.version), alias, info.model_uri, drift)


def log_merged_model(merged: MergedTrial) -> Any:
    """`mlflow.pytorch.log_model` with signature, input example and pinned requirements.

    `run_id` (passed through to `Model.log`) attaches the model to the finished search run
    without reopening it, which would rewrite its status and end time.
    """
    model, probe = merged.model, merged.probe.cpu()
    shape = (-1, *probe.shape[1:])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32),
                                                          (-1, merged.num_classes))]))
    return mlflow.pytorch.log_model(
        model, name=MODEL_ARTIFACT, serialization_format="pt2", signature=signature,
        input_example=probe[:2].numpy(),  # a batch of 2 keeps the exported batch dimension free
        pip_requirements=[f"{p}=={installed_version(p)}" for p in RUNTIME_PACKAGES],
        metadata=model_metadata(merged), run_id=merged.candidate.search_run_id)


def model_metadata(merged: MergedTrial) -> dict[str, Any]:
    """What a user of the registered model needs: the timm model it is and its input format."""
    config, point = merged.candidate.point.config, merged.candidate.point
    data = backbone_data_config(merged.model)
    return {"timm_model": config["backbone"]["name"],
            "timm_kwargs": {**config["backbone"].get("kwargs", {}),
                            "num_classes": merged.num_classes},
            "input": {"channels": data["in_chans"], "size": data["img_size"],
                      "mean": list(data["mean"]), "std": list(data["std"])},
            "karst": {"search": merged.candidate.search, "trial": point.trial,
                      "policy": merged.candidate.policy, "adapter": config["adapter"]}}


@torch.no_grad()
def stored_model_drift(model_uri: str, merged: MergedTrial) -> float:
    """Max |Δlogit| between the model as MLflow loads it back and the merged model."""
    stored = mlflow.pytorch.load_model(model_uri)
    probe = merged.probe.cpu()
    return (stored(probe) - merged.model(probe)).abs().max().item()


def version_tags(merged: MergedTrial, drift: float, alias: str) -> dict[str, str]:
    c, gate = merged.candidate, merged.gate
    recorded = c.point.test_accuracy
    return {"karst.search": c.search, "karst.search_run_id": c.search_run_id,
            "karst.trial_number": str(c.point.trial), "karst.trial_run_id": c.trial_run_id,
            "karst.policy": c.policy, "karst.alias": alias, "karst.params": str(c.point.params),
            "karst.val_accuracy": f"{c.point.val_accuracy:.6f}",
            "karst.test_accuracy": "" if recorded is None else f"{recorded:.6f}",
            "karst.merged_test_accuracy": f"{merged.test_accuracy:.6f}",
            "karst.gate.max_abs_logit_diff": f"{gate.max_abs_logit_diff:.3e}",
            "karst.gate.top1_agreement": f"{gate.top1_agreement:.6f}",
            "karst.gate.keys_match": str(gate.keys_match).lower(),
            "karst.gate.probe_size": str(gate.probe_size),
            "karst.gate.tolerance": f"{gate.config.tolerance:g}",
            "karst.export_max_abs_diff": f"{drift:.3e}"}


def _describe(merged: MergedTrial) -> str:
    c = merged.candidate
    return (f"KARST trial {c.point.trial} of search {c.search!r} ({c.policy}), merged into "
            f"{c.point.config['backbone']['name']}: {c.point.params:,} adapter params, val "
            f"{c.point.val_accuracy:.2%}, merged test {merged.test_accuracy:.2%}.")


# --------------------------------------------------------------------------- serving


def resolve_version(model_uri: str) -> Any:
    """The registry version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names.

    `ValueError` listing what exists when the name, alias or version does not.
    """
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or not rest:
        raise ValueError(f"MODEL_URI {model_uri!r}: expected models:/NAME@ALIAS or "
                         "models:/NAME/VERSION")
    name, at, alias = rest.partition("@")
    if not at:
        name, _, number = rest.rpartition("/")
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"MODEL_URI {model_uri!r}: no registered model {name!r}; registered: "
                         f"{known or 'none'}") from None
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, number)
    except MlflowException:
        raise ValueError(f"MODEL_URI {model_uri!r}: model {name!r} has no "
                         f"{'alias ' + repr(alias) if at else 'version ' + repr(number)}; its "
                         f"aliases: {model.aliases or 'none'}") from None


def serve_command(model_uri: str, *, host: str = "127.0.0.1", port: int = 5001,
                  workers: int = 1, timeout: int = 60) -> list[str]:
    """`mlflow models serve` in this environment (`--env-manager local`: torch is here)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout", str(timeout)]


def serve_env() -> dict[str, str]:
    """This process's tracking store (to resolve `models:/` URIs) and its environment's
    scripts first on PATH (MLflow starts `uvicorn` by name), as an activated venv has."""
    scripts = os.path.dirname(sys.executable)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **os.environ,
            "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": path}
