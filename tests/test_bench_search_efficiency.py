"""The search-efficiency benchmark: equal-compute accounting, the real schedulers, the front."""

import csv
import json

import pytest

from bench import replay as rp
from bench import search_efficiency as se
from bench.runs import RunCache, RunRecord, run_key
from pipeline.front import TrialPoint, default_reference, hypervolume, pareto_front
from pipeline.space import EarlyStopping, SpaceSampler, load_space
from pipeline.stopping import make_scheduler

SPACE = """\
trial:
  backbone: {name: karst_vit_fmnist}
  task: {name: digits, train_size: 64, val_size: 32}
  adapter: {method: karst, factor: 4, rank: 1, init: kaiming, alpha: 8.0}
  epochs: 3
  batch_size: 32
search:
  adapter.num_kernels: {type: categorical, choices: [1, 2]}
  adapter.rescale: {type: categorical, choices: [channel, none]}
"""


@pytest.fixture
def sampler(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return SpaceSampler(load_space(path))


def record(key: str, params: int, curve: list[float]) -> RunRecord:
    return RunRecord(key=key, config={}, params=params, val_accuracy=curve,
                     train_loss=[1.0] * len(curve), epoch_seconds=[1.0] * len(curve),
                     test_accuracy=curve[-1], seconds=1.0)


def synthetic_table(sampler) -> rp.Table:
    """The four configurations with made-up curves: every one is on the true front, and the
    larger ones learn more slowly (so a rung stops them)."""
    configs = rp.enumerate_configs(sampler)
    records = {}
    for config in configs:
        key, params = run_key(config), sampler.params(config)
        first, last = 0.8 - params / 40_000, 0.5 + params / 40_000
        records[key] = record(key, params, [first, (first + last) / 2, last])
    points = [TrialPoint(i, r.val_accuracy[-1], r.params) for i, r in
              enumerate(records.values())]
    reference = default_reference(max(r.params for r in records.values()))
    front = pareto_front(points)
    return rp.Table(records, 3, reference, front, hypervolume(front, reference))


def test_the_space_enumerates_every_valid_configuration_once(sampler):
    configs = rp.enumerate_configs(sampler)
    assert len(configs) == 4
    assert len({run_key(c) for c in configs}) == 4


def test_pareto_rungs_keep_a_small_slow_adapter_that_asha_stops():
    big, small = record("big", 50_000, [0.8, 0.85, 0.9]), record("small", 2_000, [0.5, 0.7, 0.8])
    for mode, small_epochs in (("pareto", 3), ("asha", 1), ("none", 3)):
        scheduler = make_scheduler(EarlyStopping(mode=mode), epochs=3)
        assert rp.train_under(scheduler, rp.TuneTrial("0"), big) == 3
        assert rp.train_under(scheduler, rp.TuneTrial("1"), small) == small_epochs, mode
    pareto = make_scheduler(EarlyStopping(), epochs=3)
    rp.train_under(pareto, rp.TuneTrial("0"), small)
    assert rp.train_under(pareto, rp.TuneTrial("1"), big) == 3  # larger but more accurate
    worse = record("worse", 60_000, [0.4, 0.5, 0.6])
    assert rp.train_under(pareto, rp.TuneTrial("2"), worse) == 1  # dominated at rung 1


@pytest.mark.parametrize("strategy", se.strategies(EarlyStopping()), ids=lambda s: s.name)
def test_replay_charges_exactly_the_epochs_trained(strategy, sampler):
    table = synthetic_table(sampler)
    budget = table.exhaustive_epochs
    trials = rp.replay(strategy, seed=3, table=table, sampler=sampler, budget=budget)
    spent = 0
    for t in trials:
        assert t.complete == (t.epochs == 3)
        assert t.complete or t.epochs in strategy.early_stopping.rungs(3)
        spent += t.epochs
        assert t.spent == spent
    assert spent >= budget and spent - trials[-1].epochs < budget
    if strategy.early_stopping.mode != "none":
        assert any(not t.complete for t in trials)  # slow learners stopped, epochs saved


def test_the_no_repeat_what_if_trains_each_configuration_at_most_once(sampler):
    table = synthetic_table(sampler)
    what_if = next(s for s in se.variants(EarlyStopping()) if s.skip_seen)
    trials = rp.replay(what_if, seed=0, table=table, sampler=sampler,
                       budget=table.exhaustive_epochs)
    keys = [t.key for t in trials]
    assert len(keys) == len(set(keys)) and trials[-1].spent <= table.exhaustive_epochs


def test_the_exhaustive_strategy_reaches_the_whole_true_hypervolume(sampler):
    table = synthetic_table(sampler)
    exhaustive = se.strategies(EarlyStopping())[0]
    replays = rp.run_replays(exhaustive, range(3), table, sampler)
    assert replays.at(1.0, table) == [pytest.approx(1.0)] * 3
    assert all(v < 1.0 for v in replays.at(0.5, table))  # half the configs: not all the front


def test_a_stopped_trial_never_counts_on_the_front(sampler):
    table = synthetic_table(sampler)
    best = max(table.records.values(), key=lambda r: r.val_accuracy[-1])
    stopped = rp.ReplayedTrial(best.key, 1, complete=False, spent=1)
    assert rp.hv_curve([stopped], table) == [(0, 0.0)]
    complete = rp.ReplayedTrial(best.key, 3, complete=True, spent=4)
    assert rp.hv_curve([stopped, complete], table)[-1][0] == 4
    assert rp.hv_curve([stopped, complete], table)[-1][1] > 0


@pytest.mark.slow
def test_the_script_trains_the_table_once_and_writes_the_docs(tmp_path):
    space_file, results, docs = tmp_path / "space.yaml", tmp_path / "table.jsonl", tmp_path / "d"
    space_file.write_text(SPACE)
    se.main(["--space", str(space_file), "--seeds", "2", "--results", str(results),
             "--docs", str(docs)])
    lines = results.read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(line)["val_accuracy"]) == 3 for line in lines)
    text = (docs / "benchmarks.md").read_text()
    assert "<!-- search_efficiency:begin -->" in text and "goal ≥ 95%" in text
    assert (docs / "figures" / "search_efficiency.png").stat().st_size > 0
    with (docs / "tables" / "search_efficiency.csv").open() as f:
        rows = list(csv.DictReader(f))
    exhaustive = [r for r in rows if r["strategy"].startswith("exhaustive")]
    assert float(next(r for r in exhaustive if r["compute_fraction"] == "1.0")
                 ["hv_fraction_mean"]) == 1.0

    cache = RunCache(results)  # a rerun reads the table back and trains nothing
    rp.tabulate(SpaceSampler(load_space(space_file)), cache)
    assert cache.trained == 0
