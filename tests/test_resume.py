"""A search whose driver is killed mid-run, then `karst search --resume`: nothing lost or doubled.

The driver runs as a real `karst search` process and is killed with SIGKILL, process group and
all, once MLflow shows a finished trial; the resume is a second real process. Two settings:
the driver with its own local Ray, which dies with it (a laptop that crashed), and a driver
connected to a running multi-node cluster (`ray.cluster_utils.Cluster`), which survives it
(a laptop that disconnected from `ray up`'s cluster). The MLflow store and Ray's storage are
the test's own.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from pipeline.cli import app

TRIALS, EPOCHS = 6, 4
SPACE = f"""\
trial:
  backbone: {{name: karst_vit_fmnist}}
  task: {{name: digits, train_size: 320, val_size: 64}}
  adapter: {{method: karst, init: kaiming, alpha: 8.0}}
  epochs: {EPOCHS}
  batch_size: 32
search:
  adapter.num_kernels: {{type: categorical, choices: [1, 2, 4]}}
  adapter.rank: {{type: categorical, choices: [1, 2]}}
  optim.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
early_stopping: {{mode: none}}
"""
KARST = [sys.executable, "-c", "from pipeline.cli import app; app()"]


def _children(client: MlflowClient, name: str) -> list:
    return client.search_runs(["0"], f"tags.`karst.search` = '{name}' "
                                     "and tags.`karst.kind` = 'trial'")


def _kill_after_first_complete(driver: subprocess.Popen, client: MlflowClient,
                               name: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        done = [r for r in _children(client, name) if r.data.tags.get("karst.state") == "complete"]
        if done:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            return len(done)
        time.sleep(0.2)
    raise AssertionError(f"no trial finished in {timeout} s (driver exit {driver.poll()}): "
                         f"{driver.stdout.read() if driver.poll() is not None else ''}")


@pytest.fixture(params=["local", "cluster"])
def ray_address(request):
    """`local`: each `karst search` process starts its own Ray. `cluster`: a CPU-less head and
    two one-CPU worker nodes that outlive the drivers."""
    if request.param == "local":
        yield "local"
        return
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    yield cluster.address
    cluster.shutdown()


@pytest.mark.slow
def test_a_killed_search_resumes_to_exactly_its_trials(ray_address, tracking, tmp_path):
    client = MlflowClient(tracking)
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [*KARST, "search", "space.yaml", "--trials", str(TRIALS), "--name", "killed",
         "--sampler", "random", "--storage", str(tmp_path / "ray"), "--address", ray_address],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    done_before = _kill_after_first_complete(driver, client, "killed")
    assert done_before < TRIALS, "the search ended before the kill: nothing left to resume"

    resumed = subprocess.run([*KARST, "search", "--resume", "killed", "--address", ray_address],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    children = _children(client, "killed")
    assert sorted(int(r.data.tags["karst.trial_number"]) for r in children) == list(range(TRIALS))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["karst.state"] for r in children} == {"complete"}
    for run in children:  # every epoch of every trial is in MLflow
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert steps == set(range(1, EPOCHS + 1)), run.info.run_name
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags["karst.resumed"] == "1"
    assert "pareto_front.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_resume_refuses_unknown_and_finished_searches(tracking):
    unknown = CliRunner().invoke(app, ["search", "--resume", "nope"])
    assert unknown.exit_code != 0 and "no search named 'nope'" in unknown.output

    import mlflow

    with mlflow.start_run(tags={"karst.kind": "search", "karst.search": "done"}):
        mlflow.log_param("storage", "/nonexistent")
    finished = CliRunner().invoke(app, ["search", "--resume", "done"])
    assert finished.exit_code != 0 and "finished already" in finished.output


def test_a_search_name_cannot_be_used_twice(tracking, tmp_path):
    import mlflow

    with mlflow.start_run(tags={"karst.kind": "search", "karst.search": "taken"}):
        pass
    (tmp_path / "space.yaml").write_text(SPACE)
    again = CliRunner().invoke(app, ["search", "space.yaml", "--name", "taken"])
    assert again.exit_code != 0 and "exists already" in again.output
    assert "--resume taken" in again.output
