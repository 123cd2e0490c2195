"""`karst train` end to end: one MLflow run holding everything the issue lists."""

import re

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app

CONFIG = """\
backbone: {name: karst_vit_fmnist, pretrained: true}
task: {source: builtin, name: digits, train_size: 200, val_size: 100}
adapter: {method: karst, num_kernels: 2, factor: 8, rank: 2, alpha: 4.0}
optim: {lr: 3.0e-3, warmup_epochs: 1}
epochs: 2
batch_size: 50
"""


def run_cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_train_logs_one_complete_run_and_resumes_into_it(tracking, tmp_path):
    client = MlflowClient(tracking)
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG)
    ckpt = tmp_path / "ckpt"
    result = run_cli("train", str(path), "--set", "seed=3", "--checkpoint-dir", str(ckpt))
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output

    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tiny"
    assert run.data.tags["karst.config_file"] == str(path)
    assert run.data.params["adapter.num_kernels"] == "2"
    assert run.data.params["seed"] == "3"
    assert run.data.metrics["params"] > 0
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    for key in ("train_loss", "val_accuracy", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["adapter.safetensors"]

    # the same command with more epochs resumes from the checkpoint into the same run
    again = run_cli("train", str(path), "--set", "seed=3", "--set", "epochs=3",
                    "--checkpoint-dir", str(ckpt))
    assert again.exit_code == 0, again.output
    assert len(client.search_runs(experiment_ids=["0"])) == 1
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]


BAD = [
    ("backbone: {name: vit_tinny_patch16_224}\n", r"backbone.name"),
    ("adapter: {method: karst, factor: 5}\n", r"adapter: factor=\(5, 5\) does not divide"),
    ("task: {source: vtab, path: /nonexistent/vtab}\n", r"task.path"),
    ("task: {source: builtin, name: digits, num_classes: 7}\n", r"task.num_classes"),
    ("epochs: -1\n", r"epochs: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_input_fails_before_any_run_is_logged(tracking, tmp_path, text, message):
    client = MlflowClient(tracking)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("train", str(path))
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert client.search_experiments()[0].name == "Default"
    assert client.search_runs(experiment_ids=["0"]) == []
