"""The `karst` command line."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Tune, merge and ship KARST adapters for timm vision backbones.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def main() -> None:
    """karst-search: multi-kernel Kronecker adapters, searched and shipped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger = logging.getLogger("pipeline")  # e.g. the keys a checkpoint left out
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _epoch_progress(total: int) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)


@app.command()
def train(
    config_file: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Trial config."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="Override one field, e.g. --set optim.lr=3e-3."),
    experiment: str | None = typer.Option(None, help="MLflow experiment (default: MLflow's)."),
    checkpoint_dir: Path | None = typer.Option(
        None, help="Checkpoint every epoch here; the same command resumes from it."),
) -> None:
    """Fine-tune once as CONFIG.yaml says and log it as one MLflow run."""
    from pipeline.config import ConfigError, load_trial_config
    from pipeline.trial import default_device, prepare_trial

    try:
        config = load_trial_config(config_file, overrides)
        prepared = prepare_trial(config, default_device())  # every check, before MLflow
    except (ConfigError, ValueError) as err:
        raise _fail(str(err)) from None
    _train_and_log(config, prepared, config_file, experiment, checkpoint_dir)


def _train_and_log(config, prepared, config_file: Path, experiment: str | None,  # noqa: ANN001
                   checkpoint_dir: Path | None) -> None:
    import mlflow

    from pipeline import tracking
    from pipeline.trial import run_trial

    with tracking.trial_run(config, run_name=config_file.stem, source=str(config_file),
                            experiment=experiment, checkpoint_dir=checkpoint_dir) as run, \
            _epoch_progress(config.epochs) as bar:
        task = bar.add_task(f"{config.adapter.method} on {config.task.name}",
                            total=config.epochs, status="")

        def on_epoch(report):  # noqa: ANN001, ANN202
            tracking.log_epoch(report)
            bar.update(task, completed=report.epoch,
                       status=f"loss {report.train_loss:.3f}  val {report.val_accuracy:.1%}")

        result = run_trial(config, prepared=prepared, on_epoch=on_epoch,
                           checkpoint_dir=checkpoint_dir)
        tracking.log_result(result)
    best = max(result.reports, key=lambda r: r.val_accuracy)
    seconds = sum(r.epoch_seconds for r in result.reports)
    console.print(
        f"[bold]{config.adapter.method}[/] on {config.task.name} with {config.backbone.name}: "
        f"test accuracy [bold]{result.test_accuracy:.1%}[/], final val "
        f"{result.reports[-1].val_accuracy:.1%} (best {best.val_accuracy:.1%} at epoch "
        f"{best.epoch}), {result.params:,} adapter params, {seconds:.1f} s over "
        f"{len(result.reports)} epochs.\n"
        f"MLflow run {run.info.run_id} in {mlflow.get_tracking_uri()}")


@app.command()
def pretrain(
    epochs: int = typer.Option(4, min=1, help="Training epochs over the 60 000 train images."),
    out: Path | None = typer.Option(
        None, help="Where the weights (safetensors + metadata) go; default: the package's "
                   "pipeline/weights/karst_vit_fmnist.safetensors, which the backbone loads."),
    data_dir: Path | None = typer.Option(
        None, help="Folder with the Fashion-MNIST IDX files (default: Debian's "
                   "dataset-fashion-mnist, else torchvision's download)."),
    device: str = typer.Option("cpu", help="cpu (reproduces the shipped weights) or cuda."),
) -> None:
    """Pretrain the built-in backbone karst_vit_fmnist on Fashion-MNIST and save its weights."""
    from pipeline.backbones import BUILTIN_ARCH, BUILTIN_WEIGHTS
    from pipeline.pretrain import PRETRAIN_RECIPE, pretrain_builtin

    console.print(f"[bold]Backbone[/] karst_vit_fmnist {BUILTIN_ARCH}, from scratch")
    console.print(f"[bold]Recipe[/] {dict(PRETRAIN_RECIPE, epochs=epochs)} (AdamW, cosine "
                  "with linear warm-up); Fashion-MNIST 60 000 train / 10 000 test")
    table = Table("epoch", "train loss", "test acc", "seconds")
    with Progress(TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("fit", total=epochs)

        def on_epoch(report):  # noqa: ANN001, ANN202
            table.add_row(str(report.epoch), f"{report.train_loss:.3f}",
                          f"{report.val_accuracy:.1%}", f"{report.epoch_seconds:.0f}")
            progress.advance(bar)

        try:
            result = pretrain_builtin(epochs=epochs, out=out or BUILTIN_WEIGHTS, data_dir=data_dir,
                                      device=device, on_epoch=on_epoch)
        except ValueError as err:
            raise _fail(str(err)) from None
    console.print(table)
    console.print(f"[bold]Test accuracy[/] {result.test_accuracy:.2%} on 10 000 test images, "
                  f"{result.seconds / 60:.1f} min of training")
    console.print(f"[bold]Weights saved[/] {result.path} "
                  f"({result.path.stat().st_size / 1e6:.2f} MB)")


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
            raise _fail("--resume NAME continues a search with the space it started with; "
                        "leave SPACE.yaml out")
        _resume(resume, address)
        return
    if space_file is None:
        raise _fail("give a SPACE.yaml to search, or --resume NAME")
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
        raise _fail(f"--sampler {sampler!r} is not valid; choose one of {list(SAMPLERS)}")
    try:
        space = load_space(space_file)
        report = describe(SpaceSampler(space), seed=seed)
    except (ConfigError, ValueError) as err:
        raise _fail(str(err)) from None
    _print_dry_run(report)
    return space


def _check_search_name(name: str) -> None:
    from pipeline.search import check_new_name

    try:
        check_new_name(name)
    except ValueError as err:
        raise _fail(str(err)) from None


def _resume(name: str, address: str | None) -> None:
    """Resume search `name`: checked in MLflow first, so a bad name fails before Ray starts."""
    from pipeline.search import resumable_search, resume_search

    try:
        run, _ = resumable_search(name)
    except ValueError as err:
        raise _fail(str(err)) from None
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
        raise _fail(f"--address {address!r}: cannot reach the Ray cluster ({err}); check "
                    "`ray status` on the head node, or leave --address out for a local Ray"
                    ) from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a dead `host:port`: Ray itself retries for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise _fail(f"--address {address!r}: nothing answers there ({err}); start the cluster "
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
            raise _fail(str(err)) from None
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
                      _adapter_summary(p.config.get("adapter", {})),
                      "–" if lr is None else f"{lr:.2g}")
    console.print(table)


def _adapter_summary(adapter: dict) -> str:
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
        raise _fail(str(err)) from None
    _front_table(points)


@app.command()
def promote(
    search_name: str = typer.Argument(..., metavar="SEARCH", help="Search name."),
    policy: str | None = typer.Option(
        None, help="knee (default), max-accuracy, budget:<params> or smallest-within:<delta> "
                   "(delta a fraction of accuracy: 0.01 = one point)."),
    trial: int | None = typer.Option(None, min=0, help="Promote this trial instead of a "
                                                       "policy's choice."),
    model_name: str | None = typer.Option(
        None, help="Registered model name (default: the search name)."),
    alias: str = typer.Option("champion", help="Alias moved to the new version (e.g. one per "
                                               "budget); earlier versions stay registered."),
    tolerance: float = typer.Option(1e-4, min=0.0, help="Gate: largest |Δlogit| allowed "
                                                        "between merged and adapted model."),
    min_agreement: float = typer.Option(1.0, min=0.0, max=1.0,
                                        help="Gate: top-1 agreement required."),
    probe_size: int = typer.Option(64, min=2, help="Gate: probe images (validation split)."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the choice; merge nothing."),
) -> None:
    """Merge a search's chosen trial into a plain timm model, gate it, register it under ALIAS.

    Exit status: 0 registered, 1 the gate refused the merge (figures printed, registry
    untouched), 2 bad input.
    """
    from pipeline.promote import GateConfig, choose
    from pipeline.registry import check_registry_names

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the tables
    if policy is not None and trial is not None:
        raise _fail(f"--policy {policy!r} and --trial {trial}: give one of them, not both")
    model_name = model_name or search_name
    try:
        check_registry_names(model_name, alias)
        candidate = choose(search_name, policy=None if trial is not None else policy or "knee",
                           trial=trial)
    except ValueError as err:
        raise _fail(str(err)) from None
    _candidate_table(candidate)
    if not dry_run:
        gate = GateConfig(tolerance=tolerance, min_agreement=min_agreement, probe_size=probe_size)
        _merge_and_register(candidate, gate, device, model_name, alias)


def _candidate_table(candidate) -> None:  # noqa: ANN001
    p = candidate.point
    table = Table("search", "chosen by", "trial", "adapter params", "val acc", "test acc",
                  "adapter", title="Promotion candidate (chosen on validation accuracy)")
    test = "–" if p.test_accuracy is None else f"{p.test_accuracy:.2%}"
    table.add_row(candidate.search, candidate.policy, str(p.trial), f"{p.params:,}",
                  f"{p.val_accuracy:.2%}", test, _adapter_summary(p.config.get("adapter", {})))
    console.print(table)


def _merge_and_register(candidate, gate, device: str | None, model_name: str,  # noqa: ANN001
                        alias: str) -> None:
    from mlflow.exceptions import MlflowException

    from pipeline.promote import merge_and_gate
    from pipeline.registry import ExportMismatch, register
    from pipeline.trial import default_device

    try:
        merged = merge_and_gate(candidate, gate, device or default_device())
    except (ValueError, MlflowException) as err:
        raise _fail(str(err)) from None
    _gate_table(merged)
    if not merged.gate.passed:
        for failure in merged.gate.failures():
            console.print(f"[bold red]gate failed:[/] {failure}")
        console.print("Nothing was registered.")
        raise typer.Exit(code=1)
    try:
        done = register(merged, model_name=model_name, alias=alias)
    except ExportMismatch as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=1) from None
    except (ValueError, MlflowException) as err:
        raise _fail(str(err)) from None
    console.print(f"[bold green]Registered[/] {done.model_name} version {done.version}, alias "
                  f"[bold]{done.alias}[/] → {done.uri} (stored copy max |Δlogit| "
                  f"{done.export_max_abs_diff:.1e}; logged model {done.logged_model_uri})")
    console.print(f"Serve it: karst serve {done.uri}")


def _gate_table(merged) -> None:  # noqa: ANN001
    g, recorded = merged.gate, merged.candidate.point.test_accuracy
    table = Table("check", "figure", "required", "ok", title="Merge gate (merged vs adapted)")
    rows = [("max |Δlogit|", f"{g.max_abs_logit_diff:.2e}", f"≤ {g.config.tolerance:g}",
             g.max_abs_logit_diff <= g.config.tolerance),
            ("top-1 agreement", f"{g.top1_agreement:.2%} of {g.probe_size}",
             f"≥ {g.config.min_agreement:.0%}", g.top1_agreement >= g.config.min_agreement),
            ("state dict = vanilla timm", "yes" if g.keys_match else
             f"{len(g.missing_keys)} missing, {len(g.unexpected_keys)} unexpected", "equal",
             g.keys_match)]
    for check, figure, required, ok in rows:
        table.add_row(check, figure, required, "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    trial_test = "–" if recorded is None else f"{recorded:.2%}"
    console.print(f"Test accuracy: merged [bold]{merged.test_accuracy:.2%}[/], trial recorded "
                  f"{trial_test} (reported only; never used to choose)")


@app.command()
def serve(
    model_uri: str = typer.Argument(..., metavar="MODEL_URI",
                                    help="models:/NAME@ALIAS or models:/NAME/VERSION."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback "
                                               "exposes the model to the network."),
    workers: int = typer.Option(1, min=1, help="Server worker processes."),
    timeout: int = typer.Option(60, min=1, help="Seconds allowed per request."),
) -> None:
    """Serve a registered model over HTTP (`mlflow models serve` in this environment)."""
    import sys

    from pipeline.registry import resolve_version, serve_command, serve_env

    try:
        version = resolve_version(model_uri)
    except ValueError as err:
        raise _fail(str(err)) from None
    trial = version.tags.get("karst.trial_number", "?")
    console.print(f"Serving [bold]{model_uri}[/] (version {version.version}, trial {trial}) on "
                  f"http://{host}:{port}: POST /invocations with "
                  '{"inputs": \\[image, ...]} (float32, normalised as the model\'s metadata '
                  "says); GET /ping for readiness. Ctrl-C stops it.")
    command = serve_command(model_uri, host=host, port=port, workers=workers, timeout=timeout)
    sys.stdout.flush()
    os.execve(command[0], command, serve_env())  # the server takes over this process


cluster_app = typer.Typer(help="Ray cluster files for `ray up` (docs/cluster.md).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
def cluster_check(
    file: Path = typer.Argument(..., metavar="FILE", help="A Ray cluster file."),
) -> None:
    """Check FILE offline: Ray's schema with Ray's defaults filled in, then the project's rules."""
    from rich.markup import escape

    from pipeline.cluster import RULES, check_cluster_file
    from pipeline.config import ConfigError

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        problems = check_cluster_file(file)
    except ConfigError as err:
        raise _fail(str(err)) from None
    if problems:
        console.print(f"[bold red]{escape(str(file))}: {len(problems)} problem(s)[/]")
        for problem in problems:
            console.print(f"  [bold]{escape(problem.field)}[/]: {escape(problem.message)}")
        raise typer.Exit(code=1)
    console.print(f"[green]ok[/] {escape(str(file))}: Ray's schema (with Ray's defaults) and "
                  f"the project's {len(RULES)} rules pass")
