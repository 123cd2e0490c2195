"""The replay behind `bench.search_efficiency`: a tabulated space and a strategy run on it.

`tabulate` trains (or reads back) every configuration of a discrete space once at full
budget. `replay` then runs a search strategy against that table with the real components
of the search: the Optuna sampler `pipeline.search.SAMPLERS` builds, in a two-objective
study asked define-by-run through `SpaceSampler.suggest`, and the Ray Tune scheduler
`pipeline.stopping.make_scheduler` builds, fed one result per epoch. A stopped trial is told
to Optuna as pruned and never enters the front; compute is charged in epochs trained;
trials run one after another (the asynchronous search simulated sequentially).
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import optuna
from ray.tune.schedulers import TrialScheduler

from bench.runs import RunCache, RunRecord, run_key
from pipeline.config import TrialConfig
from pipeline.front import (
    COMPLETE,
    STOPPED,
    Reference,
    TrialPoint,
    default_reference,
    hypervolume,
    pareto_front,
)
from pipeline.search import SAMPLERS
from pipeline.space import CategoricalDim, EarlyStopping, OutOfBudget, SpaceSampler
from pipeline.stopping import make_scheduler

MAX_SEEN_IN_A_ROW = 50  # skip_seen: proposals of known configurations before giving up


@dataclass(frozen=True)
class Strategy:
    name: str
    sampler: str  # a key of pipeline.search.SAMPLERS
    early_stopping: EarlyStopping
    exhaustive: bool = False  # every configuration once, in a seeded random order
    #: what-if, not what pipeline.search does: a configuration already trained is not
    #: trained again; its outcome is told to Optuna again at no cost
    skip_seen: bool = False


@dataclass(frozen=True)
class Table:
    """Every configuration at full budget: the benchmark's ground truth."""

    records: dict[str, RunRecord]  # run_key(config) → record
    epochs: int
    reference: Reference
    true_front: list[TrialPoint]
    true_hv: float

    @property
    def exhaustive_epochs(self) -> int:
        return sum(r.epochs for r in self.records.values())


@dataclass(frozen=True)
class ReplayedTrial:
    key: str
    epochs: int  # trained, hence charged
    complete: bool  # trained to the full budget (only these can enter the front)
    spent: int  # epochs charged so far, this trial included


class TuneTrial(NamedTuple):
    """What the Ray Tune schedulers read from a trial."""

    trial_id: str

def enumerate_configs(sampler: SpaceSampler) -> list[TrialConfig]:
    """Every valid configuration of a discrete space inside its budget, in grid order."""
    search = sampler.space.search
    continuous = [key for key, dim in search.items() if dim.type == "float"]
    if continuous:
        raise ValueError(f"search.{continuous[0]} is a float range; a tabular benchmark needs "
                         "a discrete space: make it categorical")
    keys = list(search)
    grids = [d.choices if isinstance(d, CategoricalDim) else d.values() for d in search.values()]
    configs = []
    for combo in itertools.product(*grids):
        values = dict(zip(keys, combo, strict=True))
        params = sampler.count_or_none(values)
        if params is not None and sampler.space.budget.admits(params):
            configs.append(sampler.build(values))
    return configs


def tabulate(sampler: SpaceSampler, cache: RunCache) -> Table:
    """Train (or read back) every configuration at full budget."""
    configs = enumerate_configs(sampler)
    records = {}
    for i, config in enumerate(configs, 1):
        records[run_key(config)] = cache.run(config, label=f"config {i}/{len(configs)}")
    points = [TrialPoint(i, r.val_accuracy[-1], r.params) for i, r in enumerate(records.values())]
    reference = default_reference(max(p.params for p in points))
    front = pareto_front(points)
    return Table(records, sampler.base.epochs, reference, front, hypervolume(front, reference))


def train_under(scheduler: TrialScheduler, trial: TuneTrial, record: RunRecord) -> int:
    """Epochs `trial` trains before `scheduler` stops it: `record.epochs` if it never does.

    One result per epoch, as the search's workers report them. The last epoch completes
    the trial (the real search then reports `full_budget`), so it is never a stopping point.
    """
    scheduler.on_trial_add(None, trial)
    for epoch in range(1, record.epochs):
        result = {"epoch": epoch, "val_accuracy": record.val_accuracy[epoch - 1],
                  "params": record.params, "full_budget": False}
        if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
            return epoch
    return record.epochs


def replay(strategy: Strategy, seed: int, table: Table, sampler: SpaceSampler,
           budget: int) -> list[ReplayedTrial]:
    """Run `strategy` against the table until `budget` epochs are spent (or, with
    `skip_seen`, until the sampler proposes only configurations it has seen)."""
    if strategy.exhaustive:
        keys = sorted(table.records)
        random.Random(seed).shuffle(keys)
        spent = itertools.accumulate(table.records[k].epochs for k in keys)
        return [ReplayedTrial(k, table.records[k].epochs, True, s)
                for k, s in zip(keys, spent, strict=True)]
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=SAMPLERS[strategy.sampler](seed))
    scheduler = make_scheduler(strategy.early_stopping, table.epochs)
    trials: list[ReplayedTrial] = []
    outcomes: dict[str, bool] = {}  # key → trained to completion, for skip_seen
    spent = seen_in_a_row = 0
    while spent < budget and seen_in_a_row < MAX_SEEN_IN_A_ROW:
        trial = study.ask()
        try:
            config = sampler.suggest(trial)
        except OutOfBudget:  # as the search does: refused before training, no compute
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        record = table.records[run_key(config)]
        if strategy.skip_seen and record.key in outcomes:
            _tell(study, trial, record, outcomes[record.key])
            seen_in_a_row += 1
            continue
        seen_in_a_row = 0
        trained = train_under(scheduler, TuneTrial(str(trial.number)), record)
        spent += trained
        outcomes[record.key] = trained == record.epochs
        _tell(study, trial, record, outcomes[record.key])
        trials.append(ReplayedTrial(record.key, trained, outcomes[record.key], spent))
    return trials


def _tell(study: optuna.Study, trial: optuna.Trial, record: RunRecord, complete: bool) -> None:
    """As pipeline.search does: both objectives for a complete trial, else PRUNED."""
    if complete:
        study.tell(trial, [record.val_accuracy[-1], record.params])
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def hv_curve(trials: Sequence[ReplayedTrial], table: Table) -> list[tuple[int, float]]:
    """(epochs spent, fraction of the true hypervolume) after each trial that finished.

    The front is `pipeline.front.pareto_front` of every trial so far, stopped ones included
    with their truncated accuracy: it keeps complete trials only, as in the real search.
    """
    points, curve = [], [(0, 0.0)]
    for i, t in enumerate(trials):
        record = table.records[t.key]
        points.append(TrialPoint(i, record.val_accuracy[t.epochs - 1], record.params,
                                 state=COMPLETE if t.complete else STOPPED))
        if t.complete:
            front = pareto_front(points)
            curve.append((t.spent, hypervolume(front, table.reference) / table.true_hv))
    return curve


def fraction_at(curve: Sequence[tuple[int, float]], spent: float) -> float:
    """The hypervolume fraction reached with at most `spent` epochs."""
    return max((hv for s, hv in curve if s <= spent), default=0.0)


class TrialCounts(NamedTuple):
    started: float
    stopped: float  # share of those started
    repeats: float  # share of those started


@dataclass(frozen=True)
class Replays:
    strategy: Strategy
    runs: list[list[ReplayedTrial]]  # one per seed
    curves: list[list[tuple[int, float]]]
    budget_fraction: float  # of the exhaustive compute, where each run stopped asking

    def at(self, fraction: float, table: Table) -> list[float]:
        return [fraction_at(c, fraction * table.exhaustive_epochs) for c in self.curves]

    def trials_within(self, fraction: float, table: Table) -> TrialCounts:
        """Means over seeds of the trials started within the compute, and of the shares of
        them stopped early and of them repeating a configuration trained before."""
        limit = fraction * table.exhaustive_epochs
        started = [[t for t in run if t.spent - t.epochs < limit] for run in self.runs]
        stopped = [sum(not t.complete for t in run) / max(1, len(run)) for run in started]
        repeats = [(len(run) - len({t.key for t in run})) / max(1, len(run)) for run in started]
        return TrialCounts(statistics.mean(len(run) for run in started),
                           statistics.mean(stopped), statistics.mean(repeats))



def run_replays(strategy: Strategy, seeds: Sequence[int], table: Table,
                sampler: SpaceSampler, budget_fraction: float = 1.0) -> Replays:
    budget = round(budget_fraction * table.exhaustive_epochs)
    runs = [replay(strategy, seed, table, sampler, budget) for seed in seeds]
    return Replays(strategy, runs, [hv_curve(run, table) for run in runs], budget_fraction)
