"""Tracking under load: metric throughput and losses per backend and concurrency.

Trial-like processes (one MLflow run each) log the per-epoch metrics of `tracking.log_epoch`
at every step, all at once, then every value is counted back from the store. Three ways of
tracking, side by side in one run:

- `postgresql`: `mlflow server` over a throwaway PostgreSQL (the cluster file's setup);
- `sqlite`: `mlflow server` over a SQLite file;
- `sqlite-file`: no server, every process writing the SQLite file itself (what a search on
  one machine does when MLFLOW_TRACKING_URI is left at its default, sqlite:///mlflow.db).

A backend "fails" at the first concurrency with an error or a lost value.

    .venv/bin/python bench/tracking_load.py [--processes 1,4,8,16,32] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import LoadResult, MlflowServer, Postgres, log_concurrently  # noqa: E402

BACKENDS = ("postgresql", "sqlite", "sqlite-file")


def tracking_uri(backend: str, directory: Path, stack: ExitStack, workers: int) -> str:
    """Start what `backend` needs (closed by `stack`) and return the URI trials log to."""
    if backend == "sqlite-file":
        return f"sqlite:///{directory / 'direct.db'}"
    store = (stack.enter_context(Postgres()).uri if backend == "postgresql"
             else f"sqlite:///{directory / 'server.db'}")
    server = MlflowServer(store, directory / f"artifacts-{backend}", workers=workers)
    return stack.enter_context(server).url


def measure(backend: str, levels: list[int], steps: int, workers: int) -> list[LoadResult]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        uri = tracking_uri(backend, Path(tmp), stack, workers)
        results = []
        for processes in levels:
            result = log_concurrently(uri, processes, steps)
            results.append(result)
            print(f"{backend:12} {processes:4} processes  {result.per_second:7.1f} metrics/s  "
                  f"errors {len(result.errors):4}  lost {result.lost:5} of {result.expected}",
                  flush=True)
            for error in result.errors[:3]:
                print(f"    {error}")
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,4,8,16,32",
                        help="concurrency levels, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="steps (epochs) per process")
    parser.add_argument("--server-workers", type=int, default=4,
                        help="mlflow server --workers (MLflow's default: 4)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    levels = [int(n) for n in args.processes.split(",")]
    print(f"{args.steps} steps x 3 metrics per process, mlflow server --workers "
          f"{args.server_workers}")
    summary = {}
    for backend in args.backends.split(","):
        results = measure(backend, levels, args.steps, args.server_workers)
        failing = next((r.processes for r in results if r.errors or r.lost), None)
        summary[backend] = (max(r.per_second for r in results), failing)
    print("\nbackend       best metrics/s  first failing concurrency")
    for backend, (best, failing) in summary.items():
        print(f"{backend:12} {best:15.1f}  {failing or f'none up to {max(levels)}'}")


if __name__ == "__main__":
    main()
