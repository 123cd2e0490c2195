"""The `karst` application: the Typer app, its console, and how a command fails."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(help="Tune, merge and ship KARST adapters for timm vision backbones.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def main() -> None:
    """karst-search: multi-kernel Kronecker adapters, searched and shipped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep tables clean
    logger = logging.getLogger("pipeline")  # e.g. the keys a checkpoint left out
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)
