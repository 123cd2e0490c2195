"""Trials that fail inside a real search: one raises, one's loss becomes NaN. Each is recorded
as failed with its reason, the search goes on, the front ignores them."""

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import validate_trial_config
from pipeline.search import run_search
from pipeline.space import load_space
from pipeline.tracking import trial_run

# digits holds 1 797 images: train_size 5000 raises while the trial loads its task; lr 1e6
# drives the loss to NaN at the second step. Only (96, 0.003) trains to the end.
SPACE = """\
trial:
  backbone: {name: karst_vit_fmnist}
  task: {name: digits, train_size: 96, val_size: 64}
  adapter: {method: karst, init: kaiming, alpha: 8.0, factor: 8}
  epochs: 1
  batch_size: 32
search:
  task.train_size: {type: categorical, choices: [96, 5000]}
  optim.lr: {type: categorical, choices: [0.003, 1.0e6]}
early_stopping: {mode: none}
"""
REASONS = {"raises": "leaves no test images of the 1797 in digits",
           "nan": "train loss became nan at epoch 1, step 2"}


def outcome(config: dict) -> str:
    if config["task"]["train_size"] == 5000:
        return "raises"
    return "nan" if config["optim"]["lr"] > 1 else "trains"


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_search_goes_on(local_ray, tracking, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    result = run_search(load_space(space_file), name="failing", trials=4, sampler="random",
                        seed=2, storage=tmp_path / "ray")

    kinds = {p.trial: outcome(p.config) for p in result.points}
    assert set(kinds.values()) == {"raises", "nan", "trains"}  # the seed draws all three
    assert len(result.points) == 4
    for point in result.points:
        assert point.state == ("complete" if kinds[point.trial] == "trains" else "failed")
        assert result.optuna_states[point.trial] == ("COMPLETE" if point.state == "complete"
                                                     else "FAIL")
    assert result.front and {p.trial for p in result.front} <= {
        t for t, kind in kinds.items() if kind == "trains"}

    client = MlflowClient(tracking)
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(int(r.data.tags["karst.trial_number"]) for r in children) == sorted(kinds)
    for run in children:
        kind = kinds[int(run.data.tags["karst.trial_number"])]
        if kind == "trains":
            assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
            continue
        assert run.info.status == "FAILED"
        assert run.data.tags.get("karst.state") == "failed", run.data.tags
        assert REASONS[kind] in run.data.tags.get("karst.error", ""), run.data.tags


def test_a_failed_run_says_why_and_resuming_it_clears_that(tracking, tmp_path):
    config = validate_trial_config({})
    with pytest.raises(FloatingPointError), \
            trial_run(config, run_name="t", checkpoint_dir=tmp_path) as run:
        raise FloatingPointError("train loss became nan at epoch 2, step 5")
    client = MlflowClient(tracking)
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["karst.state"] == "failed"
    assert failed.data.tags["karst.error"] == ("FloatingPointError: train loss became nan at "
                                               "epoch 2, step 5")

    with trial_run(config, run_name="t", checkpoint_dir=tmp_path) as resumed:
        assert resumed.info.run_id == run.info.run_id
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert not {"karst.state", "karst.error"} & finished.data.tags.keys()
