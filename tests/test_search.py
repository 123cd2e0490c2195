"""A real two-objective search: local Ray, a real Optuna study, a real MLflow store."""

import mlflow
import pytest
import ray
from mlflow.tracking import MlflowClient

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
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_search_logs_parent_children_and_a_front(local_ray, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    result = run_search(load_space(space_file), name="tiny", trials=4, space_file=str(space_file),
                        seed=0, max_concurrent=2, storage=tmp_path / "ray")

    assert result.directions == ["MAXIMIZE", "MINIMIZE"]
    assert len(result.points) == 4 and all(p.state == "complete" for p in result.points)
    assert 1 <= len(result.front) <= 4
    client = MlflowClient(uri)
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.data.tags["karst.trial_number"] for r in children) == ["0", "1", "2", "3"]
    assert all("test_accuracy" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"pareto_front.csv", "pareto_front.json", "pareto_front.png",
            "hypervolume.json"} <= artifacts
