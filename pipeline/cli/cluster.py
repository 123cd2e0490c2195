"""`karst cluster check`: a Ray cluster file against Ray's schema and the project's rules."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.cli.app import app, console, fail

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
        raise fail(str(err)) from None
    if problems:
        console.print(f"[bold red]{escape(str(file))}: {len(problems)} problem(s)[/]")
        for problem in problems:
            console.print(f"  [bold]{escape(problem.field)}[/]: {escape(problem.message)}")
        raise typer.Exit(code=1)
    console.print(f"[green]ok[/] {escape(str(file))}: Ray's schema (with Ray's defaults) and "
                  f"the project's {len(RULES)} rules pass")
