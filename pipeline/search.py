"""Two-objective search: Optuna proposes, Ray Tune runs, MLflow records, the front is kept.

Ray Tune's `OptunaSearch` gets both objectives (`val_accuracy` max, `params` min) and
nothing else does: setting metric/mode on `TuneConfig` too would silently make the study
single-objective (DESIGN.md §4). `_TwoObjectiveSearch` adds what the plain searcher lacks:
a sample outside the parameter budget is refused before any worker starts, and a trial
that did not train to its full budget is told to Optuna as pruned, never as a finished
trial with a truncated score.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from pipeline import tracking
from pipeline.config import TrialConfig
from pipeline.front import (
    COMPLETE,
    FAILED,
    STOPPED,
    TrialPoint,
    default_reference,
    draw_front,
    hypervolume_history,
    pareto_front,
    plot_data,
    write_front,
)
from pipeline.space import OutOfBudget, SearchSpace, SpaceSampler
from pipeline.stopping import make_scheduler
from pipeline.trial import default_device, prepare_trial, run_trial

OBJECTIVES = (["val_accuracy", "params"], ["max", "min"])
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
}
_MAX_DRAWS = 1000  # out-of-budget samples refused in a row before giving up


class _TwoObjectiveSearch(OptunaSearch):
    def __init__(self, sampler: SpaceSampler, optuna_sampler: optuna.samplers.BaseSampler):
        self._space_sampler = sampler
        metric, mode = OBJECTIVES
        super().__init__(space=self._define, metric=metric, mode=mode, sampler=optuna_sampler)

    def _define(self, trial: Any) -> dict[str, Any]:
        config = self._space_sampler.suggest(trial)
        return {"trial_config": config.model_dump(mode="json"), "trial_number": trial.number}

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(_MAX_DRAWS):
            try:
                return super().suggest(trial_id)
            except OutOfBudget:
                refused = self._ot_trials.pop(trial_id)
                self._ot_study.tell(refused, state=optuna.trial.TrialState.PRUNED)
        raise RuntimeError(f"{_MAX_DRAWS} samples in a row fell outside the budget; widen it")

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result is not None and not result.get("full_budget"):
            result = None  # stopped early or failed: PRUNED (or FAIL), never COMPLETE
        super().on_trial_complete(trial_id, result, error)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


@dataclass
class SearchProgress:
    """A live snapshot for displays: trial counts by state and the front so far."""

    total: int
    running: int = 0
    complete: int = 0
    stopped: int = 0
    failed: int = 0
    front: list[TrialPoint] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.complete + self.stopped + self.failed


class _ProgressCallback(tune.Callback):
    """Runs in the driver: turns Ray Tune's trial events into `SearchProgress` snapshots."""

    def __init__(self, total: int, on_progress: Callable[[SearchProgress], None]) -> None:
        self.progress = SearchProgress(total)
        self.on_progress = on_progress
        self.last: dict[str, dict] = {}
        self.points: list[TrialPoint] = []

    def __getstate__(self) -> dict:
        """Ray pickles callbacks into its experiment state; a display cannot be pickled."""
        return {**self.__dict__, "on_progress": lambda progress: None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.running += 1
        self.on_progress(self.progress)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        point = trial_point(trial.config, self.last.get(trial.trial_id))
        self.progress.running -= 1
        if point.state == COMPLETE:
            self.progress.complete += 1
            self.points.append(point)
            self.progress.front = pareto_front(self.points)
        else:
            self.progress.stopped += 1
        self.on_progress(self.progress)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.running -= 1
        self.progress.failed += 1
        self.on_progress(self.progress)


@dataclass(frozen=True)
class SearchResult:
    name: str
    parent_run_id: str
    points: list[TrialPoint]
    front: list[TrialPoint]
    train_seconds: list[float]  # per complete trial: building, training, testing it
    directions: list[str]  # the Optuna study's, e.g. ["MAXIMIZE", "MINIMIZE"]
    optuna_states: dict[int, str]  # Optuna trial number → COMPLETE / PRUNED / FAIL


def _train_trial(config: dict[str, Any], *, parent_run_id: str, tracking_uri: str,
                 search: str) -> None:
    """One trial on a Ray worker: its own MLflow child run, one report per epoch."""
    trial_config = TrialConfig.model_validate(config["trial_config"])
    number = config["trial_number"]
    mlflow.set_tracking_uri(tracking_uri)
    while mlflow.active_run():  # left open by a trial stopped earlier in this reused actor
        mlflow.end_run(status="KILLED")
    tags = {"karst.search": search, "karst.trial_number": str(number),
            "mlflow.parentRunId": parent_run_id}
    with tracking.trial_run(trial_config, run_name=f"{search}-trial-{number:04d}",
                            tags=tags) as run:
        start = time.perf_counter()
        prepared = prepare_trial(trial_config, default_device())

        def on_epoch(report) -> None:  # noqa: ANN001
            tracking.log_epoch(report)
            tune.report({"epoch": report.epoch, "val_accuracy": report.val_accuracy,
                         "train_loss": report.train_loss, "params": prepared.params,
                         "full_budget": False, "mlflow_run_id": run.info.run_id})

        result = run_trial(trial_config, prepared=prepared, on_epoch=on_epoch)
        train_seconds = time.perf_counter() - start
        tracking.log_result(result)
        mlflow.set_tag("karst.state", COMPLETE)
        last = result.reports[-1]
        tune.report({"epoch": last.epoch, "val_accuracy": last.val_accuracy,
                     "train_loss": last.train_loss, "params": result.params,
                     "test_accuracy": result.test_accuracy, "full_budget": True,
                     "mlflow_run_id": run.info.run_id, "train_seconds": train_seconds})


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_search(space: SearchSpace, *, name: str, trials: int, space_file: str = "",
               sampler: str = "tpe", seed: int = 0, storage: Path | None = None,
               on_progress: Callable[[SearchProgress], None] | None = None) -> SearchResult:
    """Run `trials` trials on the current Ray cluster; one MLflow parent run holds them.

    Resources per trial, the concurrency limit and early stopping come from the space.
    """
    space_sampler = SpaceSampler(space)
    searcher = _TwoObjectiveSearch(space_sampler, SAMPLERS[sampler](seed))
    max_concurrent = space.max_concurrent
    with mlflow.start_run(run_name=name, tags={"karst.kind": "search",
                                               "karst.search": name}) as parent:
        mlflow.log_params({"space_file": space_file, "sampler": sampler, "seed": seed,
                           "trials": trials, "max_concurrent": max_concurrent,
                           "budget": json.dumps(space.budget.model_dump()),
                           "early_stopping": json.dumps(space.early_stopping.model_dump()),
                           "git_commit": git_commit()})
        trainable = tune.with_parameters(_train_trial, parent_run_id=parent.info.run_id,
                                         tracking_uri=mlflow.get_tracking_uri(), search=name)
        scheduler = make_scheduler(space.early_stopping, space_sampler.base.epochs)
        tuner = tune.Tuner(
            tune.with_resources(trainable, space.resources.model_dump()),
            tune_config=tune.TuneConfig(  # no metric/mode here: it would drop an objective
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                scheduler=scheduler, num_samples=trials,
                reuse_actors=True),  # a fresh worker per trial costs ~2.7 s (bench)
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage) if storage else None, verbose=0,
                callbacks=[_ProgressCallback(trials, on_progress)] if on_progress else None),
        )
        grid = tuner.fit()
        points = [_point(r) for r in grid]
        _close_unfinished_runs(grid)
        front = pareto_front(points)
        _log_front(points, front, name)
    study = searcher.study
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    seconds = [r.metrics["train_seconds"] for r in grid if "train_seconds" in (r.metrics or {})]
    return SearchResult(name, parent.info.run_id, points, front, seconds,
                        [d.name for d in study.directions], states)


def _point(result: Any) -> TrialPoint:
    return trial_point(result.config, result.metrics, failed=result.error is not None)


def trial_point(config: dict | None, metrics: dict | None, *, failed: bool = False) -> TrialPoint:
    """A trial as the front sees it, from its config and last reported metrics."""
    config, metrics = config or {}, metrics or {}
    state = FAILED if failed else COMPLETE if metrics.get("full_budget") else STOPPED
    return TrialPoint(trial=int(config.get("trial_number", -1)),
                      val_accuracy=float(metrics.get("val_accuracy", 0.0)),
                      params=int(metrics.get("params", 0)), state=state,
                      test_accuracy=metrics.get("test_accuracy"),
                      config=config.get("trial_config", {}))


def _close_unfinished_runs(grid: Any) -> None:
    """A trial Ray stopped or that crashed never closed its MLflow run: record why, end it."""
    client = mlflow.MlflowClient()
    for result in grid:
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if not run_id or (result.metrics or {}).get("full_budget"):
            continue
        state, status = (FAILED, "FAILED") if result.error else (STOPPED, "KILLED")
        client.set_tag(run_id, "karst.state", state)
        if result.error:
            client.set_tag(run_id, "karst.error", str(result.error)[:5000])
        client.set_terminated(run_id, status=status)


def _log_front(points: list[TrialPoint], front: list[TrialPoint], name: str) -> None:
    """The front's CSV/JSON, the Pareto plot and the hypervolume history, on the parent."""
    finished = sorted(points, key=lambda p: p.trial)
    reference = default_reference(max((p.params for p in points), default=1))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_front(front, directory)
        draw_front(plot_data(points), directory / "pareto_front.png", title=name)
        history = hypervolume_history(finished, reference)
        (directory / "hypervolume.json").write_text(json.dumps(
            {"reference": reference._asdict(), "space": "(val_accuracy, log10 params)",
             "history": history}, indent=2))
        mlflow.log_artifacts(str(directory))
    if history:
        mlflow.log_metric("hypervolume", history[-1])


def find_search_run(name: str) -> Any:
    """The MLflow parent run of search `name`; `ValueError` listing the known ones if none."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`karst.kind` = 'search'")
    matches = [r for r in runs if r.data.tags.get("karst.search") == name]
    if not matches:
        known = sorted({r.data.tags.get("karst.search", "?") for r in runs})
        raise ValueError(f"no search named {name!r} in {mlflow.get_tracking_uri()}; "
                         f"known searches: {known or 'none'}")
    return max(matches, key=lambda r: r.info.start_time)


def load_front(name: str) -> list[TrialPoint]:
    """The front a finished search logged (`pareto_front.json` on its parent run)."""
    run = find_search_run(name)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                       artifact_path="pareto_front.json",
                                                       dst_path=tmp)
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ValueError(f"search {name!r} has no pareto_front.json yet (still running, "
                             f"or interrupted: resume it): {err}") from None
        rows = json.loads(Path(path).read_text())
    return [TrialPoint(**row) for row in rows]
