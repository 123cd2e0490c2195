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
from pipeline.front import (
    COMPLETE,
    FAILED,
    STOPPED,
    TrialPoint,
    default_reference,
    draw_front,
    draw_hypervolume,
    hypervolume_history,
    pareto_front,
    plot_data,
    write_front,
)
from pipeline.space import OutOfBudget, SearchSpace, SpaceSampler
from pipeline.stopping import make_scheduler
from pipeline.trainable import train_trial

OBJECTIVES = (["val_accuracy", "params"], ["max", "min"])
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
}
_MAX_DRAWS = 1000  # out-of-budget samples refused in a row before giving up
_MAX_RETRIES = 3  # a trial whose worker died (lost node) restarts from its last checkpoint
SPACE_ARTIFACT = "space.json"  # the validated space, on the parent run: what a resume rebuilds


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
        if result is not None and result.get("error"):
            result, error = None, True  # the trial failed in its worker: FAIL
        elif result is not None and not result.get("full_budget"):
            result = None  # stopped early: PRUNED, never COMPLETE with a truncated score
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


def _ignore(progress: SearchProgress) -> None:
    pass


class _ProgressCallback(tune.Callback):
    """Runs in the driver: turns Ray Tune's trial list into `SearchProgress` snapshots.

    It counts from the trial list on every event rather than keeping tallies, so a search
    restored from Ray's saved state shows the right counts at once.
    """

    def __init__(self, total: int, on_progress: Callable[[SearchProgress], None]) -> None:
        self.total = total
        self.on_progress = on_progress

    def __getstate__(self) -> dict:
        """Ray pickles callbacks into its experiment state; a display cannot be pickled."""
        return {"total": self.total, "on_progress": _ignore}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, {})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, {trial.trial_id: "TERMINATED"})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, {trial.trial_id: "ERROR"})

    def _show(self, trials: list, just_ended: dict[str, str]) -> None:
        progress = SearchProgress(self.total)
        points = []
        for trial in trials:
            status = just_ended.get(trial.trial_id, trial.status)
            if status == "RUNNING":
                progress.running += 1
            elif status in ("TERMINATED", "ERROR"):
                points.append(trial_point(trial.config, trial.last_result,
                                          failed=status == "ERROR"))
        progress.complete = sum(p.state == COMPLETE for p in points)
        progress.stopped = sum(p.state == STOPPED for p in points)
        progress.failed = sum(p.state == FAILED for p in points)
        progress.front = pareto_front(points)
        self.on_progress(progress)


@dataclass(frozen=True)
class SearchResult:
    name: str
    parent_run_id: str
    points: list[TrialPoint]
    front: list[TrialPoint]
    train_seconds: list[float]  # per complete trial: building, training, testing it
    directions: list[str]  # the Optuna study's, e.g. ["MAXIMIZE", "MINIMIZE"]
    optuna_states: dict[int, str]  # Optuna trial number → COMPLETE / PRUNED / FAIL


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def default_storage() -> str:
    """Ray Tune's own default, made explicit so that the parent run can record it."""
    return str(Path("~/ray_results").expanduser())


def check_new_name(name: str) -> None:
    """A search name is its identity in MLflow and in Ray's storage: refuse a second one."""
    try:
        run = find_search_run(name)
    except ValueError:
        return
    raise ValueError(f"a search named {name!r} exists already (MLflow run {run.info.run_id}, "
                     f"{run.info.status}); pick another --name, or continue it with "
                     f"`karst search --resume {name}`")


def run_search(space: SearchSpace, *, name: str, trials: int, space_file: str = "",
               sampler: str = "tpe", seed: int = 0, storage: str | Path | None = None,
               on_progress: Callable[[SearchProgress], None] | None = None) -> SearchResult:
    """Run `trials` trials on the current Ray cluster; one MLflow parent run holds them.

    Resources per trial, the concurrency limit and early stopping come from the space.
    Ray Tune keeps its state under `storage`/`name`, from which `resume_search` continues.
    """
    check_new_name(name)
    space_sampler = SpaceSampler(space)
    searcher = _TwoObjectiveSearch(space_sampler, SAMPLERS[sampler](seed))
    storage = str(storage or default_storage())
    with mlflow.start_run(run_name=name, tags={"karst.kind": "search",
                                               "karst.search": name}) as parent:
        mlflow.log_params({"space_file": space_file, "sampler": sampler, "seed": seed,
                           "trials": trials, "max_concurrent": space.max_concurrent,
                           "budget": json.dumps(space.budget.model_dump()),
                           "early_stopping": json.dumps(space.early_stopping.model_dump()),
                           "storage": storage, "git_commit": git_commit()})
        mlflow.log_dict(space.model_dump(mode="json"), SPACE_ARTIFACT)
        scheduler = make_scheduler(space.early_stopping, space_sampler.base.epochs)
        tuner = tune.Tuner(
            _trainable(space, parent, name),
            tune_config=tune.TuneConfig(  # no metric/mode here: it would drop an objective
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent),
                scheduler=scheduler, num_samples=trials,
                reuse_actors=True),  # a fresh worker per trial costs ~2.7 s (bench)
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=_MAX_RETRIES),
                callbacks=[_ProgressCallback(trials, on_progress or _ignore)]),
        )
        return _conclude(tuner.fit(), searcher, name, parent.info.run_id)


def resume_search(name: str, *,
                  on_progress: Callable[[SearchProgress], None] | None = None) -> SearchResult:
    """Continue search `name` after its driver died: Ray Tune's saved state, the same Optuna
    study, the same MLflow parent run and child runs. `ValueError` if there is nothing to resume.
    """
    run, path = resumable_search(name)
    space = SearchSpace.model_validate(mlflow.artifacts.load_dict(
        f"{run.info.artifact_uri}/{SPACE_ARTIFACT}"))
    with mlflow.start_run(run_id=run.info.run_id) as parent:
        mlflow.set_tag("karst.resumed", str(int(run.data.tags.get("karst.resumed", "0")) + 1))
        tuner = tune.Tuner.restore(path, _trainable(space, parent, name),
                                   resume_unfinished=True)
        searcher = _restored_searcher(tuner, on_progress or _ignore)
        return _conclude(tuner.fit(), searcher, name, parent.info.run_id)


def resumable_search(name: str) -> tuple[Any, str]:
    """The MLflow parent run and Ray Tune state path of interrupted search `name`.

    `ValueError` saying why when there is nothing to resume; needs no running Ray.
    """
    run = find_search_run(name)
    if run.info.status == "FINISHED":
        raise ValueError(f"search {name!r} finished already (MLflow run {run.info.run_id}); "
                         f"nothing to resume: `karst front {name}` shows its front")
    path = f"{run.data.params['storage'].rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path):
        raise ValueError(f"search {name!r}: no Ray Tune state at {path} (it died before Ray "
                         "saved any, or the storage moved); start it again under a new --name")
    return run, path


def _trainable(space: SearchSpace, parent: mlflow.ActiveRun, name: str) -> Any:
    trainable = tune.with_parameters(
        train_trial, parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
        tracking_uri=mlflow.get_tracking_uri(), search=name)
    return tune.with_resources(trainable, space.resources.model_dump())


def _restored_searcher(tuner: tune.Tuner,
                       on_progress: Callable[[SearchProgress], None]) -> _TwoObjectiveSearch:
    """The searcher and display callback Ray unpickled from its saved state.

    `Tuner.restore` takes no new search algorithm or callbacks, and hands back none: they
    are reached through the restored tuner's internals (Ray 2.60).
    """
    internal = tuner._local_tuner  # noqa: SLF001
    for callback in internal.get_run_config().callbacks or []:
        if isinstance(callback, _ProgressCallback):
            callback.on_progress = on_progress
    return internal._tune_config.search_alg.searcher  # noqa: SLF001


def _conclude(grid: Any, searcher: _TwoObjectiveSearch, name: str,
              parent_run_id: str) -> SearchResult:
    """After Ray Tune returns: close what trials left open, log the front on the parent."""
    points = [_point(r) for r in grid]
    _close_unfinished_runs(grid)
    front = pareto_front(points)
    _log_front(points, front, name)
    study = searcher.study
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    seconds = [r.metrics["train_seconds"] for r in grid if "train_seconds" in (r.metrics or {})]
    return SearchResult(name, parent_run_id, points, front, seconds,
                        [d.name for d in study.directions], states)


def _point(result: Any) -> TrialPoint:
    return trial_point(result.config, result.metrics, failed=result.error is not None)


def trial_point(config: dict | None, metrics: dict | None, *, failed: bool = False) -> TrialPoint:
    """A trial as the front sees it, from its config and last reported metrics."""
    config, metrics = config or {}, metrics or {}
    failed = failed or bool(metrics.get("error"))
    state = FAILED if failed else COMPLETE if metrics.get("full_budget") else STOPPED
    return TrialPoint(trial=int(config.get("trial_number", -1)),
                      val_accuracy=float(metrics.get("val_accuracy", 0.0)),
                      params=int(metrics.get("params", 0)), state=state,
                      test_accuracy=metrics.get("test_accuracy"),
                      config=config.get("trial_config", {}))


def _close_unfinished_runs(grid: Any) -> None:
    """A trial Ray stopped, or whose worker died, never closed its MLflow run: record why."""
    client = mlflow.MlflowClient()
    for result in grid:
        metrics = result.metrics or {}
        run_id = metrics.get("mlflow_run_id")
        if not run_id or metrics.get("full_budget") or metrics.get("error"):
            continue  # closed by its worker
        if result.error:
            tags, status = tracking.failure_tags(result.error), "FAILED"
        else:
            tags, status = {"karst.state": STOPPED}, "KILLED"
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
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
        draw_hypervolume(history, reference, directory / "hypervolume.png", title=name)
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
