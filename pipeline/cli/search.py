"""`karst search` (new, dry run, resume) and `karst front`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli.app import app, console, fail


@app.command()
def search(
    space_file: Path | None = typer.Argument(None, metavar="SPACE.yaml",
                                             help="Search space (not with --resume)."),
    trials: int = typer.Option(8, min=1, help="Trials to run."),
    name: str | None = typer.Option(None, help="Search name (default: the space file's name)."),
    address: str | None = typer.Option(
        None, help="Ray cluster to run on ('auto', 'ray://host:10001'); default: RAY_ADDRESS, "
                   "else a local Ray."),
    sampler: str = typer.Option("tpe", help="Optuna sampler: tpe, nsga2, random or gp."),
    seed: int = typer.Option(0, help="Sampler seed."),
    storage: str | None = typer.Option(
        None, help="Where Ray Tune keeps the search's state and trial checkpoints (a folder, "
                   "or s3://… on a cluster); default ~/ray_results."),
    resume: str | None = typer.Option(None, metavar="NAME",
                                      help="Continue the interrupted search NAME."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and describe; run nothing."),
) -> None:
    """Search SPACE.yaml for the configurations no other beats on accuracy and size."""
    if resume:
        if space_file is not None:
            raise fail("--resume NAME continues a search with the space it started with; "
                        "leave SPACE.yaml out")
        _resume(resume, address)
        return
    if space_file is None:
        raise fail("give a SPACE.yaml to search, or --resume NAME")
    space = _checked_space(space_file, sampler, seed)
    if dry_run:
        return
    name = name or space_file.stem
    _check_search_name(name)
    _connect_ray(address)
    from pipeline.search import run_search

    _run_and_show(name, trials, lambda on_progress: run_search(
        space, name=name, trials=trials, space_file=str(space_file), sampler=sampler,
        seed=seed, storage=storage, on_progress=on_progress))


def _checked_space(space_file: Path, sampler: str, seed: int):  # noqa: ANN202
    """Load and dry-run the space, so that bad input fails before Ray starts."""
    from pipeline.config import ConfigError
    from pipeline.search import SAMPLERS
    from pipeline.space import SpaceSampler, load_space
    from pipeline.space import dry_run as describe

    if sampler not in SAMPLERS:
        raise fail(f"--sampler {sampler!r} is not valid; choose one of {list(SAMPLERS)}")
    try:
        space = load_space(space_file)
        report = describe(SpaceSampler(space), seed=seed)
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    _print_dry_run(report)
    return space


def _check_search_name(name: str) -> None:
    from pipeline.search import check_new_name

    try:
        check_new_name(name)
    except ValueError as err:
        raise fail(str(err)) from None


def _resume(name: str, address: str | None) -> None:
    """Resume search `name`: checked in MLflow first, so a bad name fails before Ray starts."""
    from pipeline.search import resumable_search, resume_search

    try:
        run, _ = resumable_search(name)
    except ValueError as err:
        raise fail(str(err)) from None
    _connect_ray(address)
    trials = int(run.data.params.get("trials", 0))
    _run_and_show(name, trials, lambda on_progress: resume_search(name, on_progress=on_progress))


def _print_dry_run(report) -> None:  # noqa: ANN001
    continuous = f" × continuous {report.continuous}" if report.continuous else ""
    console.print(f"[bold]{report.valid:,}[/] valid configurations of {report.combinations:,} "
                  f"discrete combinations{continuous}; adapter params "
                  f"{report.params_min:,} … {report.params_max:,}")
    console.print(f"[bold]Sample[/] {report.sample.adapter}, lr {report.sample.optim.lr:.2g}")


def _connect_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]}})
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise fail(f"--address {address!r}: cannot reach the Ray cluster ({err}); check "
                    "`ray status` on the head node, or leave --address out for a local Ray"
                    ) from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a dead `host:port`: Ray itself retries for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise fail(f"--address {address!r}: nothing answers there ({err}); start the cluster "
                    "(`ray up ray_cluster.yaml`) or fix the address (host:port, ray://host:port,"
                    " or auto)") from None


def _run_and_show(name: str, trials: int, start: Callable) -> None:
    """Run `start(on_progress)` (a new or resumed search) under a live progress line."""
    import mlflow

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    with Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("search", total=trials, status="starting Ray workers")

        def on_progress(p) -> None:  # noqa: ANN001
            best = max(p.front, key=lambda t: t.val_accuracy, default=None)
            front = (f"front {len(p.front)}, best {best.val_accuracy:.1%} @ {best.params:,}"
                     if best else "front –")
            bar.update(task, completed=p.finished,
                       status=f"running {p.running} · done {p.complete} · stopped {p.stopped}"
                              f" · failed {p.failed} · {front}")

        try:
            result = start(on_progress)
        except ValueError as err:
            raise fail(str(err)) from None
    states = {s: sum(p.state == s for p in result.points) for s in ("complete", "stopped",
                                                                    "failed")}
    console.print(f"[bold]{name}[/]: {states}")
    _front_table(result.front)
    console.print(f"MLflow parent run {result.parent_run_id} in {mlflow.get_tracking_uri()}; "
                  "browse: mlflow ui --backend-store-uri " + mlflow.get_tracking_uri())


def _front_table(front) -> None:  # noqa: ANN001
    table = Table("trial", "adapter params", "val acc", "test acc", "adapter", "lr",
                  title="Pareto front (val accuracy ↑, params ↓)")
    for p in front:
        test = "–" if p.test_accuracy is None else f"{p.test_accuracy:.1%}"
        lr = p.config.get("optim", {}).get("lr")
        table.add_row(str(p.trial), f"{p.params:,}", f"{p.val_accuracy:.1%}", test,
                      adapter_summary(p.config.get("adapter", {})),
                      "–" if lr is None else f"{lr:.2g}")
    console.print(table)


def adapter_summary(adapter: dict) -> str:
    """`karst N4 f8x8 r2 channel α8`: the fields that vary in a search, in one short cell."""
    short = {"num_kernels": "N", "factor": "f", "rank": "r", "alpha": "α"}
    parts = [adapter.get("method", "?")]
    for key, prefix in short.items():
        if key in adapter:
            value = adapter[key]
            value = "x".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
            parts.append(f"{prefix}{value}")
    if adapter.get("rescale"):
        parts.append(adapter["rescale"])
    return " ".join(parts)


@app.command()
def front(name: str = typer.Argument(..., help="Search name.")) -> None:
    """Print a search's Pareto front, read back from MLflow."""
    from pipeline.search import load_front

    try:
        points = load_front(name)
    except ValueError as err:
        raise fail(str(err)) from None
    _front_table(points)
