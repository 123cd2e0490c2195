"""Early stopping on both objectives: the rung rule, and a real search it prunes."""

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import TrialScheduler

from pipeline.front import TrialPoint
from pipeline.search import run_search
from pipeline.space import EarlyStopping, load_space
from pipeline.stopping import ParetoRungScheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def test_rungs_grow_geometrically_below_the_full_budget():
    assert EarlyStopping(grace_epochs=1, reduction_factor=3).rungs(30) == [1, 3, 9, 27]
    assert EarlyStopping(grace_epochs=2, reduction_factor=2).rungs(8) == [2, 4]
    assert EarlyStopping().rungs(1) == []


def test_a_trial_goes_on_unless_one_no_larger_is_more_accurate():
    rule = ParetoRungScheduler([1], epsilon=0.0)
    assert rule.decide(1, TrialPoint(0, 0.60, 50_000)) == CONTINUE  # first at the rung
    assert rule.decide(1, TrialPoint(1, 0.30, 1_000)) == CONTINUE  # slower but smaller
    assert rule.decide(1, TrialPoint(2, 0.50, 80_000)) == STOP  # larger and worse than 0
    assert rule.decide(1, TrialPoint(3, 0.29, 1_000)) == STOP  # same size, worse than 1


def test_epsilon_spares_trials_close_to_the_front():
    rule = ParetoRungScheduler([1], epsilon=0.05)
    rule.decide(1, TrialPoint(0, 0.60, 1_000))
    assert rule.decide(1, TrialPoint(1, 0.57, 1_000)) == CONTINUE
    assert rule.decide(1, TrialPoint(2, 0.50, 1_000)) == STOP


SPACE = """\
trial:
  backbone: {name: karst_vit_fmnist}
  task: {name: digits, train_size: 256, val_size: 64}
  adapter: {method: karst, num_kernels: 2, factor: 8, rank: 2, init: kaiming, alpha: 8.0}
  optim: {warmup_epochs: 0}
  epochs: 3
  batch_size: 32
search:
  optim.lr: {type: categorical, choices: [0.01, 1.0e-7]}
max_concurrent: 1
early_stopping: {mode: pareto, grace_epochs: 1, reduction_factor: 3}
"""


@pytest.mark.slow
def test_early_stopped_trials_are_pruned_and_never_on_the_front(tracking, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        result = run_search(load_space(space_file), name="stops", trials=6, sampler="random",
                            seed=4, storage=tmp_path / "ray")
    finally:
        ray.shutdown()

    stopped = [p for p in result.points if p.state == "stopped"]
    # seed 4 draws lr 0.01, 0.01, 0.01, 0.01, 1e-7, 0.01: trial 4 is dominated at epoch 1,
    # and trial 5 then runs in the actor it leaves behind (actors are reused)
    assert stopped, "the seeded run is meant to stop the slow (lr 1e-7) trial at epoch 1"
    assert not {p.trial for p in stopped} & {p.trial for p in result.front}
    for p in stopped:
        assert result.optuna_states[p.trial] == "PRUNED"
    complete = [p for p in result.points if p.state == "complete"]
    assert all(result.optuna_states[p.trial] == "COMPLETE" for p in complete)
    client = MlflowClient(tracking)
    runs = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    states = sorted(r.data.tags.get("karst.state") for r in runs)
    assert states == ["complete"] * 5 + ["stopped"]
    assert all(r.info.status == "KILLED" for r in runs if r.data.tags["karst.state"] == "stopped")


def test_asha_lets_a_trial_reach_its_full_budget_report():
    from ray.tune.experiment import Trial

    from pipeline.stopping import make_scheduler

    asha = make_scheduler(EarlyStopping(mode="asha", grace_epochs=1, reduction_factor=3), 3)
    trial = Trial("trainable", stub=True)
    asha.on_trial_add(None, trial)
    for epoch in (1, 2, 3):  # the last epoch's report comes before the full-budget result
        assert asha.on_trial_result(None, trial, {"epoch": epoch, "val_accuracy": 0.5}) == CONTINUE
