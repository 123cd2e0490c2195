"""The `karst` command line: one module per group of commands, all on one Typer app.

The modules register their commands as they are imported: their order here is the help's.
"""
# ruff: noqa: I001

from pipeline.cli.app import app
from pipeline.cli import train, search, promote, cluster  # noqa: F401

__all__ = ["app"]
