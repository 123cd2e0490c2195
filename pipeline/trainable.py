"""What a Ray worker runs for one search trial: train it, log it to MLflow, report to Tune.

A trial can run more than once: Ray restarts it from its last checkpoint after a lost node,
and a resumed search runs again whatever the dead driver had not recorded as finished. So
the worker first looks for the trial's child run, by its stable identity (parent run +
Optuna trial number), and goes on logging into it; a trial MLflow already holds as complete
is reported from MLflow instead of being trained twice. One trial, one child run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import ray
from mlflow.entities import Run
from ray import tune

from pipeline import tracking
from pipeline.config import TrialConfig
from pipeline.front import COMPLETE
from pipeline.train import EpochReport
from pipeline.trial import default_device, prepare_trial, run_trial

SUPERSEDED = "superseded"


def train_trial(config: dict[str, Any], *, parent_run_id: str, experiment_id: str,
                tracking_uri: str, search: str) -> None:
    """Ray Tune's function trainable: one report (and checkpoint) per epoch, then the result."""
    trial_config = TrialConfig.model_validate(config["trial_config"])
    number = config["trial_number"]
    mlflow.set_tracking_uri(tracking_uri)
    while mlflow.active_run():  # left open by a trial stopped earlier in this reused actor
        mlflow.end_run(status="KILLED")
    digest = config_digest(config["trial_config"])
    recorded = recorded_run(experiment_id, parent_run_id, number, digest)
    if recorded is not None and recorded.data.tags.get("karst.state") == COMPLETE:
        tune.report(final_report(recorded.data.metrics, trial_config.epochs,
                                 recorded.info.run_id))
        return
    tags = {"karst.search": search, "karst.trial_number": str(number),
            "karst.config_digest": digest, "mlflow.parentRunId": parent_run_id}
    run_id = None
    try:
        with tracking.trial_run(trial_config, run_name=f"{search}-trial-{number:04d}", tags=tags,
                                run_id=recorded.info.run_id if recorded else None) as run, \
                _restored_checkpoint() as checkpoint_dir:
            run_id = run.info.run_id
            mlflow.set_tag("karst.ray_node", ray.get_runtime_context().get_node_id())
            report = _train(trial_config, run_id, checkpoint_dir)
    except Exception as err:  # noqa: BLE001 - the run is closed FAILED with the reason
        if run_id is None:
            raise  # no run yet: MLflow or this worker is at fault, and Ray retries
        report = _failure_report(err, run_id)
    tune.report(report)


def _train(config: TrialConfig, run_id: str, checkpoint_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    prepared = prepare_trial(config, default_device())

    def on_epoch(report: EpochReport) -> None:  # fit has just saved checkpoint_dir
        tracking.log_epoch(report)
        tune.report({"epoch": report.epoch, "val_accuracy": report.val_accuracy,
                     "train_loss": report.train_loss, "params": prepared.params,
                     "full_budget": False, "mlflow_run_id": run_id},
                    checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    result = run_trial(config, prepared=prepared, on_epoch=on_epoch,
                       checkpoint_dir=checkpoint_dir)
    train_seconds = time.perf_counter() - start
    tracking.log_result(result)
    mlflow.log_metric("train_seconds", train_seconds)
    mlflow.set_tag("karst.state", COMPLETE)
    last = result.reports[-1]
    return final_report({"val_accuracy": last.val_accuracy, "train_loss": last.train_loss,
                         "params": result.params, "test_accuracy": result.test_accuracy,
                         "train_seconds": train_seconds}, last.epoch, run_id)


def _failure_report(err: Exception, run_id: str) -> dict[str, Any]:
    """A trial that raised is reported as failed, not raised to Ray.

    Ray retries a trial that raises (`FailureConfig.max_failures`), which is right when a
    node vanished under it and wasteful when the trial itself is broken (a NaN loss, a
    config the backbone rejects): those fail the same way every time. No `epoch`, so that
    no scheduler ranks it at a rung.
    """
    return {"error": f"{type(err).__name__}: {err}", "val_accuracy": float("nan"), "params": 0,
            "full_budget": False, "mlflow_run_id": run_id}


def final_report(metrics: dict[str, float], epoch: int, run_id: str) -> dict[str, Any]:
    """The last result of a trial trained to its full budget: what the front is made of."""
    return {"epoch": epoch, "val_accuracy": metrics["val_accuracy"],
            "train_loss": metrics["train_loss"], "params": int(metrics["params"]),
            "test_accuracy": metrics["test_accuracy"],
            "train_seconds": metrics.get("train_seconds", 0.0),
            "full_budget": True, "mlflow_run_id": run_id}


def config_digest(trial_config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(trial_config, sort_keys=True).encode()).hexdigest()[:16]


def recorded_run(experiment_id: str, parent_run_id: str, number: int, digest: str) -> Run | None:
    """This trial's child run if an earlier attempt made one.

    A run with this trial number but another config was made for a trial that the resumed
    search never knew about (sampled after the dead driver's last saved state): it is tagged
    `superseded` and deleted (MLflow keeps deleted runs until `mlflow gc`).
    """
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                         f"and tags.`karst.trial_number` = '{number}'")
    for run in runs:
        if run.data.tags.get("karst.config_digest") == digest:
            return run
        client.set_tag(run.info.run_id, "karst.state", SUPERSEDED)
        client.set_terminated(run.info.run_id, status="KILLED")
        client.delete_run(run.info.run_id)
    return None


@contextmanager
def _restored_checkpoint() -> Iterator[Path]:
    """A folder for `fit`'s checkpoints, holding Tune's latest one when the trial restarts."""
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory() as folder:
        if checkpoint is not None:
            checkpoint.to_directory(folder)
        yield Path(folder)
