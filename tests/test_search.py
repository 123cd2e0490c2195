"""A real two-objective search: local Ray, a real Optuna study, a real MLflow store."""

import pytest
import ray
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.search import run_search
from pipeline.space import load_space

SPACE = """\
trial:
  backbone: {name: karst_vit_fmnist}
  task: {name: digits, train_size: 96, val_size: 64}
  adapter: {method: karst, init: kaiming, alpha: 8.0}
  epochs: 2
  batch_size: 32
search:
  adapter.num_kernels: {type: categorical, choices: [1, 4]}
  adapter.factor: {type: categorical, choices: [4, 32]}
  adapter.rank: {type: categorical, choices: [1, 2]}
  optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
early_stopping: {mode: none}
"""


@pytest.mark.slow
def test_search_logs_parent_children_and_a_front(local_ray, tracking, tmp_path):
    uri = tracking
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    snapshots = []
    result = run_search(load_space(space_file), name="tiny", trials=4, space_file=str(space_file),
                        seed=0, storage=tmp_path / "ray",
                        on_progress=lambda p: snapshots.append((p.running, p.finished,
                                                                len(p.front))))
    assert snapshots[-1] == (0, 4, len(result.front))
    assert max(running for running, _, _ in snapshots) <= 2  # the space's max_concurrent

    assert result.directions == ["MAXIMIZE", "MINIMIZE"]
    assert len(result.points) == 4 and all(p.state == "complete" for p in result.points)
    assert 1 <= len(result.front) <= 4
    client = MlflowClient(uri)
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.data.tags["karst.trial_number"] for r in children) == ["0", "1", "2", "3"]
    assert all("test_accuracy" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"pareto_front.csv", "pareto_front.json", "pareto_front.png",
            "hypervolume.json", "hypervolume.png"} <= artifacts

    shown = CliRunner().invoke(app, ["front", "tiny"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    for p in result.front:
        assert f"{p.params:,}" in shown.output


def run_cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_dry_run_describes_the_space_and_starts_nothing(tmp_path):
    result = run_cli("search", "search_spaces/demo.yaml", "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "190 valid configurations of 240 discrete combinations" in text
    assert "adapter params 1,792 … 98,848" in text
    assert not ray.is_initialized()


BAD_CLI = [
    (["--sampler", "cmaes"], r"--sampler 'cmaes' is not valid; choose one of"),
    (["--address", "127.0.0.1:9"], r"--address '127.0.0.1:9': nothing answers there"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CLI)
def test_bad_options_fail_before_any_cluster_work(args, message):
    import re

    result = run_cli("search", "search_spaces/demo.yaml", *args)
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not ray.is_initialized()


def test_front_of_an_unknown_search_names_the_known_ones(tracking):
    result = run_cli("front", "nope")
    assert result.exit_code == 2
    assert "no search named 'nope'" in result.output
