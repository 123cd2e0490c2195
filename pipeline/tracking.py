"""MLflow logging of one trial: config as params, per-epoch metrics, result, adapter artifact.

The tracking URI is MLflow's own business: `MLFLOW_TRACKING_URI` when set, else MLflow's
default (`sqlite:///mlflow.db` in the working directory).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

import karst
from pipeline.config import TrialConfig, flatten
from pipeline.front import FAILED
from pipeline.train import EpochReport
from pipeline.trial import TrialResult

#: MLflow refuses param values longer than this; longer ones are cut with a marker.
_MAX_PARAM_CHARS = 6000
_MAX_ERROR_CHARS = 5000  # of a failed run's reason, tag `karst.error`
FAILURE_TAGS = {"karst.state", "karst.error"}


def log_config(config: TrialConfig) -> None:
    params = {k: (v if len(v) <= _MAX_PARAM_CHARS else v[:_MAX_PARAM_CHARS - 3] + "...")
              for k, v in flatten(config).items()}
    mlflow.log_params(params)


def log_epoch(report: EpochReport) -> None:
    mlflow.log_metrics({"train_loss": report.train_loss, "val_accuracy": report.val_accuracy,
                        "epoch_seconds": report.epoch_seconds}, step=report.epoch)


def log_result(result: TrialResult) -> None:
    """Final metrics and the adapter file (trainable tensors + config, safetensors)."""
    mlflow.log_metrics({"test_accuracy": result.test_accuracy, "params": result.params})
    with tempfile.TemporaryDirectory() as tmp:
        path = karst.save_adapter(result.model, Path(tmp) / "adapter.safetensors")
        mlflow.log_artifact(str(path))


RUN_ID_FILE = "mlflow_run_id"


@contextmanager
def trial_run(config: TrialConfig, *, run_name: str, source: str | None = None,
              experiment: str | None = None, checkpoint_dir: Path | None = None,
              tags: dict[str, str] | None = None,
              run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one fine-tune (`karst train`, or a search trial with its `tags`).

    A resumed fine-tune goes on logging into the run it started instead of opening a
    second one: `run_id` names it (a search finds its trial's run by tags), or with a
    `checkpoint_dir` the run id is kept there. An error inside ends the run FAILED with tags
    `karst.state=failed` and `karst.error` (the reason).
    """
    if experiment:
        mlflow.set_experiment(experiment)
    id_file = checkpoint_dir / RUN_ID_FILE if checkpoint_dir else None
    if run_id is None and id_file and id_file.exists():
        run_id = id_file.read_text().strip()
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if id_file and not run_id:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id)
        if run_id:  # resumed: a failure the attempt before recorded no longer stands
            for key in FAILURE_TAGS & run.data.tags.keys():
                mlflow.MlflowClient().delete_tag(run_id, key)
        else:
            mlflow.set_tags({"karst.kind": "trial", "karst.method": config.adapter.method,
                             **({"karst.config_file": source} if source else {}),
                             **(tags or {})})
            log_config(config)
        try:
            yield run
        except Exception as err:  # the run ends FAILED; say why where the error happened
            mlflow.set_tags(failure_tags(err))
            raise


def failure_tags(err: BaseException) -> dict[str, str]:
    """The tags of a failed run: `karst.state=failed` and the reason, cut to a tag's size."""
    return {"karst.state": FAILED, "karst.error": f"{type(err).__name__}: {err}"[:_MAX_ERROR_CHARS]}
