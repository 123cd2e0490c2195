"""The MLflow tracking server restarted mid-search: workers retry, no metric is lost.

A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts) serves a real search on
a local Ray. Once a trial has logged an epoch, the server is stopped, left down for a few
seconds (trials keep training and their MLflow calls retry), and started again on the same
port with the same stores.
"""

import threading
import time

import mlflow
import pytest
from conftest import small_search_space
from mlflow.tracking import MlflowClient

from pipeline.search import run_search

TRIALS, EPOCHS, DOWN_SECONDS = 2, 8, 8  # two trials, both running through the outage


@pytest.fixture
def fast_retries(monkeypatch):
    """MLflow's client retries 1, 2, 4, 8… s apart (default 2, 4, 8…): a shorter test. Set
    before Ray starts, so that its workers inherit it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _wait_for_an_epoch(client: MlflowClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.search_runs(["0"], "tags.`karst.kind` = 'trial'"):
            if client.get_metric_history(run.info.run_id, "val_accuracy"):
                return
        time.sleep(0.2)
    raise AssertionError(f"no epoch logged in {timeout} s")


@pytest.mark.slow
def test_a_restarted_tracking_server_loses_no_metric(fast_retries, mlflow_server, local_ray,
                                                      tmp_path):
    server = mlflow_server
    mlflow.set_tracking_uri(server.url)  # the workers get it from run_search
    client = MlflowClient(server.url)
    outcome: dict = {}
    search = threading.Thread(target=lambda: outcome.update(result=run_search(
        small_search_space(EPOCHS, train_size=640), name="restart", trials=TRIALS, sampler="random",
        storage=tmp_path / "ray")))
    search.start()
    _wait_for_an_epoch(client)
    server.stop()
    down = time.time() * 1000
    time.sleep(DOWN_SECONDS)
    up = time.time() * 1000  # metrics stamped between down and up were logged while it was down
    server.start()
    search.join(timeout=600)
    assert not search.is_alive(), "the search did not finish after the server came back"
    mlflow.set_tracking_uri(None)

    assert [p.state for p in outcome["result"].points] == ["complete"] * TRIALS
    children = client.search_runs(["0"], "tags.`karst.kind` = 'trial'")
    assert sorted(int(r.data.tags["karst.trial_number"]) for r in children) == list(range(TRIALS))
    logged_while_down = []
    for run in children:
        for metric in ("val_accuracy", "train_loss", "epoch_seconds"):
            history = client.get_metric_history(run.info.run_id, metric)
            logged_while_down += [m for m in history if down < m.timestamp < up]
            steps = [m.step for m in history]
            assert sorted(set(steps)) == list(range(1, EPOCHS + 1)), (run.info.run_name, metric)
        assert {"test_accuracy", "params", "train_seconds"} <= set(run.data.metrics)
        for metric in ("test_accuracy", "params", "train_seconds"):
            history = client.get_metric_history(run.info.run_id, metric)
            logged_while_down += [m for m in history if down < m.timestamp < up]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["adapter.safetensors"]
    assert logged_while_down, "no trial logged while the server was down: the test proved nothing"
