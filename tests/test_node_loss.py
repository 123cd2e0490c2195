"""A worker node lost mid-trial, on a real multi-node Ray cluster on one machine.

`ray.cluster_utils.Cluster` starts a head with no CPUs (trials cannot land on it) and two
one-CPU worker nodes; once a trial has logged two epochs, the node that runs it is removed
and a fresh node joins, as an autoscaler would replace a lost spot instance. The trial must
restart from its last checkpoint, and the search must end with every trial in MLflow once.
"""

import threading
import time

import pytest
import ray
from conftest import small_search_space
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from pipeline.search import run_search

TRIALS, EPOCHS = 3, 5
WORKER = {"num_cpus": 1, "num_gpus": 0}


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False,  # the driver attaches to the head
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    nodes = [cluster.add_node(**WORKER) for _ in range(2)]
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _node_of_a_trial_past(client: MlflowClient, nodes: list, epochs: int,
                          timeout: float = 300) -> object:
    """Wait for a running trial with `epochs` logged; the cluster node it runs on."""
    by_id = {node.node_id: node for node in nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.search_runs(["0"], "tags.`karst.kind` = 'trial' and "
                                             "attributes.status = 'RUNNING'"):
            logged = client.get_metric_history(run.info.run_id, "val_accuracy")
            if len(logged) >= epochs and run.data.tags.get("karst.ray_node") in by_id:
                return by_id[run.data.tags["karst.ray_node"]]
        time.sleep(0.2)
    raise AssertionError(f"no trial reached epoch {epochs} in {timeout} s")


@pytest.mark.slow
def test_a_lost_node_restarts_its_trial_from_the_last_checkpoint(cluster, tracking, tmp_path):
    cluster, nodes = cluster
    client = MlflowClient(tracking)
    outcome: dict = {}
    search = threading.Thread(target=lambda: outcome.update(result=run_search(
        small_search_space(EPOCHS), name="spot", trials=TRIALS, sampler="random",
        storage=tmp_path / "ray")))
    search.start()
    node = _node_of_a_trial_past(client, nodes, epochs=2)
    cluster.remove_node(node)
    cluster.add_node(**WORKER)
    search.join(timeout=600)
    assert not search.is_alive(), "the search did not finish after the node loss"

    result = outcome["result"]
    assert [p.state for p in result.points] == ["complete"] * TRIALS
    children = client.search_runs(["0"], "tags.`karst.kind` = 'trial'")
    assert sorted(int(r.data.tags["karst.trial_number"]) for r in children) == list(range(TRIALS))
    assert node.node_id not in {r.data.tags["karst.ray_node"] for r in children}  # it moved
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, "val_accuracy")
                 for r in children}
    for history in histories.values():
        assert {m.step for m in history} == set(range(1, EPOCHS + 1))
    # From its checkpoint, a restarted trial repeats at most the epoch it was in; from
    # scratch it would log its first two epochs again.
    assert max(len(h) for h in histories.values()) <= EPOCHS + 1
