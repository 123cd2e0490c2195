"""Trials placed by the resources the space asks for, on a two-node `ray.cluster_utils.Cluster`
whose nodes declare one logical GPU each: `gpu: 0.5` packs two trials per GPU. There is no
CUDA here, so the trials train on the CPU (`default_device`) while holding their GPU share."""

from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.search import run_search
from pipeline.space import SearchSpace

SPACE = {
    "trial": {"backbone": {"name": "karst_vit_fmnist"},
              "task": {"name": "digits", "train_size": 320, "val_size": 32},
              "adapter": {"method": "karst", "factor": 8}, "epochs": 2, "batch_size": 32},
    "search": {"adapter.num_kernels": {"type": "categorical", "choices": [1, 2]}},
    "resources": {"cpu": 1, "gpu": 0.5},
    "max_concurrent": 8,  # the GPUs, not the limiter nor the 8 CPUs, bound the concurrency
    "early_stopping": {"mode": "none"},
}


@pytest.fixture
def two_gpu_nodes():
    """A CPU-less head (like ray_cluster.yaml's) and two workers of 4 CPUs and 1 GPU each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=4, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_half_gpu_trials_are_packed_two_per_gpu(two_gpu_nodes, tracking, tmp_path):
    running = []
    result = run_search(SearchSpace.model_validate(SPACE), name="packed", trials=6,
                        storage=tmp_path / "ray", on_progress=lambda p: running.append(p.running))

    assert [p.state for p in result.points] == ["complete"] * 6  # on the CPU, no CUDA here
    # Never more than 2 GPUs / 0.5 per trial, though 8 CPUs were free; more than one trial per
    # GPU at once (3 or 4 running: how many overlap depends on the machine's speed).
    assert 3 <= max(running) <= 4
    placed = [group for group in ray.util.placement_group_table().values()
              if group["bundles_to_node_id"].get(0)]
    assert all(group["bundles"][0] == {"CPU": 1.0, "GPU": 0.5} for group in placed)
    per_node = Counter(group["bundles_to_node_id"][0] for group in placed)
    workers = {node.node_id for node in two_gpu_nodes}
    # both GPU nodes hosted trials; 4 at once means two per GPU (Ray allows 1 / 0.5 = 2 each)
    assert set(per_node) == workers and min(per_node.values()) >= 2
