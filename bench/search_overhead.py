"""Per-trial orchestration overhead of a search: Ray Tune, Optuna and MLflow around a trial.

Runs a real search (local Ray, Optuna TPE, MLflow SQLite store in a temporary folder) over
trivial trials: the built-in backbone, 32 digits, one epoch, early stopping off, at
concurrency 2. Each trial reports how long it spent building, training and testing itself;
the overhead per trial is what the search took beyond that work:

    overhead = (search wall time − Σ trial work / concurrency) / trials

Ray's start-up is timed apart (it is paid once per search, not per trial). The overhead is
split with the child runs' MLflow start and end times: the MLflow logging a worker does inside
a trial's run (params, per-epoch metrics, the adapter artifact, tags) against the rest (Ray
Tune's scheduling and result handling, Optuna's ask and tell, creating the run).

    .venv/bin/python bench/search_overhead.py [--trials 16]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        start = time.perf_counter()
        ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False,
                 log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        result = run_search(SearchSpace.model_validate(SPACE), name="overhead",
                            trials=args.trials, storage=Path(tmp) / "ray")
        wall = time.perf_counter() - start
        ray.shutdown()
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`karst.kind` = 'trial'")
    in_runs = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    work = sum(result.train_seconds)
    overhead = (wall - work / CONCURRENCY) / args.trials
    logging = (in_runs - work) / CONCURRENCY / args.trials
    print(f"{args.trials} trivial trials at concurrency {CONCURRENCY}: search wall {wall:.1f} s, "
          f"trial work {work:.1f} s in all ({work / args.trials:.2f} s per trial)")
    print(f"orchestration overhead per trial: {overhead:.2f} s (target <= 0.5 s); "
          f"Ray start-up, once per search: {ray_start:.1f} s")
    print(f"  of which MLflow logging inside the trials' runs: {logging:.2f} s; Ray Tune, "
          f"Optuna and run creation: {overhead - logging:.2f} s")


if __name__ == "__main__":
    main()
