"""Search spaces: validation, define-by-run sampling that never yields an invalid config."""

from pathlib import Path

import optuna
import pytest

import karst
from pipeline.config import ConfigError
from pipeline.space import OutOfBudget, SpaceSampler, dry_run, load_space

SPACES = sorted(Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml"))
BASE = """\
trial:
  backbone: {name: karst_vit_fmnist}
  task: {name: mnist}
  adapter: {method: karst}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_validate_and_have_valid_configurations(path):
    report = dry_run(SpaceSampler(load_space(path)))
    assert 0 < report.valid <= report.combinations
    assert 0 < report.params_min <= report.params_max
    assert isinstance(report.sample.adapter, karst.KarstConfig)


def test_demo_space_respects_its_budget_and_the_backbone_shapes():
    sampler = SpaceSampler(load_space("search_spaces/demo.yaml"))
    report = dry_run(sampler)
    assert report.params_max <= 100_000
    assert report.continuous == ["optim.lr"]
    # width 96: factor 32 leaves d/f = 3, so only ranks 1 and 2 are valid with it
    assert sampler.ranks_for(32, [1, 2, 4, 8]) == [1, 2]
    assert sampler.ranks_for(4, [1, 2, 4, 8]) == [1, 2, 4, 8]


def test_define_by_run_never_yields_an_invalid_configuration():
    sampler = SpaceSampler(load_space("search_spaces/demo.yaml"))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    seen_rank_names, told = set(), 0
    for _ in range(40):
        trial = study.ask()
        try:
            config = sampler.suggest(trial)
        except OutOfBudget:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        params = karst.param_count(sampler.skeleton, config.adapter)  # raises if invalid
        assert params == trial.user_attrs["params"] <= 100_000
        seen_rank_names |= {k for k in trial.params if k.startswith("adapter.rank")}
        study.tell(trial, params / 1e5)
        told += 1
    assert told >= 20
    assert {"adapter.rank|factor=32", "adapter.rank|factor=4"} <= seen_rank_names


def test_budget_is_enforced_from_the_closed_form_count(tmp_path):
    text = BASE + "search:\n  adapter.num_kernels: {type: categorical, choices: [1, 8]}\n" \
        "budget: {max_params: 20000}\n"
    sampler = SpaceSampler(load_space(write(tmp_path, text)))
    assert dry_run(sampler).valid == 1
    with pytest.raises(OutOfBudget, match=r"adapter params is outside the budget"):
        sampler.suggest(optuna.trial.FixedTrial({"adapter.num_kernels": 8}))


BAD = [
    ("search:\n  optim.lr: {type: beta, low: 1, high: 2}\n",
     r"search.optim.lr: Input tag 'beta' found using 'type' does not match"),
    ("search:\n  optim.lr: {type: float, low: 0.1, high: 0.01}\n",
     r"empty range: low=0.1 > high=0.01; swap them"),
    ("search:\n  optim.lr: {type: float, low: 0.0, high: 0.01, log: true}\n",
     r"log=true needs low > 0"),
    ("search:\n  adapter.rank: {type: categorical, choice: [1, 2]}\n",
     r"search.adapter.rank.categorical.choices: Field required"),
    ("search:\n  adapter.rank: {type: categorical, choices: []}\n", r"at least 1 item"),
    ("search:\n  adapter.kernels: {type: categorical, choices: [1, 2]}\n",
     r"(?s)search.adapter.kernels.* does not take field\(s\) \[.kernels.\]"),
    ("search:\n  optim.momentum: {type: float, low: 0.1, high: 0.9}\n",
     r"optim.momentum: Extra inputs are not permitted"),
    ("budget: {min_params: 10, max_params: 5}\n", r"min_params=10 > max_params=5"),
    ("sampler: tpe\n", r"sampler: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_spaces_are_refused_with_the_field_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, BASE + text))


def test_a_space_with_no_valid_factor_or_no_config_in_budget_is_refused(tmp_path):
    no_factor = BASE + "search:\n  adapter.factor: {type: categorical, choices: [5, 7]}\n"
    with pytest.raises(ConfigError, match=r"none of \[5, 7\] divides every target layer"):
        SpaceSampler(load_space(write(tmp_path, no_factor)))
    tiny = BASE + "search:\n  adapter.rank: {type: categorical, choices: [1, 2]}\n" \
        "budget: {max_params: 10}\n"
    with pytest.raises(ConfigError, match=r"no configuration meets the budget"):
        dry_run(SpaceSampler(load_space(write(tmp_path, tiny))))
    no_rank = BASE + "search:\n  adapter.rank: {type: categorical, choices: [48, 96]}\n"
    with pytest.raises(ConfigError, match=r"has no valid configuration"):
        dry_run(SpaceSampler(load_space(write(tmp_path, no_rank))))


def test_int_ranges_are_counted_and_sampled_as_ints(tmp_path):
    text = BASE + "search:\n  epochs: {type: int, low: 2, high: 4}\n" \
        "  optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
    sampler = SpaceSampler(load_space(write(tmp_path, text)))
    report = dry_run(sampler)
    assert (report.valid, report.combinations, report.continuous) == (3, 3, ["optim.lr"])
    config = sampler.suggest(optuna.trial.FixedTrial({"epochs": 3, "optim.lr": 1e-3}))
    assert (config.epochs, config.optim.lr) == (3, 1e-3)
    with pytest.raises(ConfigError, match=r"type int needs whole low and high, got 2.5, 4.0"):
        load_space(write(tmp_path, BASE + "search:\n  epochs: {type: int, low: 2.5, high: 4}\n"))
