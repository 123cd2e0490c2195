"""Per-trial orchestration overhead of a search: Ray Tune, Optuna and MLflow around a trial.

Runs real searches (local Ray, Optuna TPE, MLflow SQLite store in a temporary folder) over
trivial trials: the built-in backbone, 32 digits, one epoch, early stopping off, at
concurrency 2. Each trial reports how long it spent building, training and testing itself;
what a search takes beyond that work is its orchestration:

    orchestration = search wall time − Σ trial work / concurrency

A search pays some of it once (its workers start and import torch, timm and MLflow; the
parent run; the front logged at the end) and some per trial (Optuna's ask and tell, Ray
Tune's hand-off to a reused worker, the trial's MLflow run). Two searches of different
sizes, run one after the other, separate the two: the per-trial overhead is the slope,

    per trial = (orchestration(large) − orchestration(small)) / (trials(large) − trials(small))

and the per-search cost what is left of the small search's. A two-trial search runs first
and is not counted: it pays what only the first search of a process pays (MLflow creating
its tables, first imports in the driver). The MLflow logging inside the
trials' runs (params, per-epoch metrics, the adapter artifact, tags) is shown apart, from the
child runs' start and end times. Ray's own start-up is timed apart too.

    .venv/bin/python bench/search_overhead.py [--small 4] [--large 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402
import ray  # noqa: E402

from pipeline.search import run_search  # noqa: E402
from pipeline.space import SearchSpace  # noqa: E402

CONCURRENCY = 2
SPACE = {
    "trial": {"backbone": {"name": "karst_vit_fmnist"},
              "task": {"name": "digits", "train_size": 32, "val_size": 32},
              "adapter": {"method": "karst", "factor": 8}, "epochs": 1, "batch_size": 32},
    "search": {"adapter.num_kernels": {"type": "categorical", "choices": [1, 2, 4]},
               "adapter.rank": {"type": "categorical", "choices": [1, 2]},
               "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "max_concurrent": CONCURRENCY,
    "early_stopping": {"mode": "none"},
}


def timed_search(name: str, trials: int, storage: Path) -> tuple[float, float, float]:
    """(orchestration seconds, Σ trial work, Σ MLflow logging inside the trials' runs)."""
    start = time.perf_counter()
    result = run_search(SearchSpace.model_validate(SPACE), name=name, trials=trials,
                        storage=storage)
    wall = time.perf_counter() - start
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`karst.search` = '{name}' "
                                            "and tags.`karst.kind` = 'trial'")
    work = sum(result.train_seconds)
    in_runs = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    return wall - work / CONCURRENCY, work, in_runs - work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--large", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        start = time.perf_counter()
        ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        ray_start = time.perf_counter() - start
        timed_search("warm-up", 2, Path(tmp) / "ray")  # first-time costs: the store's tables…
        small, _, _ = timed_search("small", args.small, Path(tmp) / "ray")
        large, work, logging = timed_search("large", args.large, Path(tmp) / "ray")
        ray.shutdown()
    per_trial = (large - small) / (args.large - args.small)
    print(f"trivial trials at concurrency {CONCURRENCY}: {work / args.large:.2f} s of work "
          f"each; Ray start-up {ray_start:.1f} s")
    print(f"orchestration: {small:.1f} s for {args.small} trials, {large:.1f} s for "
          f"{args.large}")
    print(f"per-trial overhead: {per_trial:.2f} s (target <= 0.5 s), of which MLflow logging "
          f"inside the trials' runs {logging / CONCURRENCY / args.large:.2f} s; "
          f"per search: {small - args.small * per_trial:.1f} s")


if __name__ == "__main__":
    main()
