"""`karst promote` and `karst serve`: the chosen trial, merged, registered, served."""

from __future__ import annotations

import os
import sys

import typer
from rich.table import Table

from pipeline.cli.app import app, console, fail
from pipeline.cli.search import adapter_summary


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

    if policy is not None and trial is not None:
        raise fail(f"--policy {policy!r} and --trial {trial}: give one of them, not both")
    model_name = model_name or search_name
    try:
        check_registry_names(model_name, alias)
        candidate = choose(search_name, policy=None if trial is not None else policy or "knee",
                           trial=trial)
    except ValueError as err:
        raise fail(str(err)) from None
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
                  f"{p.val_accuracy:.2%}", test, adapter_summary(p.config.get("adapter", {})))
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
        raise fail(str(err)) from None
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
        raise fail(str(err)) from None
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

    from pipeline.registry import resolve_version, serve_command, serve_env

    try:
        version = resolve_version(model_uri)
    except ValueError as err:
        raise fail(str(err)) from None
    trial = version.tags.get("karst.trial_number", "?")
    console.print(f"Serving [bold]{model_uri}[/] (version {version.version}, trial {trial}) on "
                  f"http://{host}:{port}: POST /invocations with "
                  '{"inputs": \\[image, ...]} (float32, normalised as the model\'s metadata '
                  "says); GET /ping for readiness. Ctrl-C stops it.")
    command = serve_command(model_uri, host=host, port=port, workers=workers, timeout=timeout)
    sys.stdout.flush()
    os.execve(command[0], command, serve_env())  # the server takes over this process
