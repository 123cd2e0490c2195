"""Real fine-tunes for the benchmark studies, cached one JSON line per run.

A run is keyed by its whole trial config, seed included, so a rerun of a study reads back
what it already trained and trains only what is missing. The JSON-lines files under
`bench/results/` are the raw data behind `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrialConfig
from pipeline.trial import prepare_trial, run_trial

RESULTS_DIR = Path(__file__).with_name("results")


def add_common_options(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options both studies take: settings, cache file, docs folder, threads."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--results", type=Path, help="JSON-lines cache of the runs")
    parser.add_argument("--docs", type=Path, help="where benchmarks.md, figures/, tables/ go")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is "
                        "faster when other jobs share the cores")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads {threads}: give a positive thread count")
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class RunRecord:
    """What one fine-tune measured: per-epoch curves, the test accuracy, the size."""

    key: str
    config: dict[str, Any]
    params: int  # closed-form adapter count, head excluded
    val_accuracy: list[float]  # after each epoch
    train_loss: list[float]
    epoch_seconds: list[float]
    test_accuracy: float
    seconds: float  # building, training and testing, wall clock

    @property
    def epochs(self) -> int:
        return len(self.val_accuracy)


def run_key(config: TrialConfig) -> str:
    """A stable id for a config: the hash of its JSON form (seed included)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train(config: TrialConfig) -> RunRecord:
    """One fine-tune with the project's own trial code (`pipeline.trial.run_trial`)."""
    start = time.perf_counter()
    result = run_trial(config, prepared=prepare_trial(config))
    reports = result.reports
    return RunRecord(key=run_key(config), config=config.model_dump(mode="json"),
                     params=result.params, val_accuracy=[r.val_accuracy for r in reports],
                     train_loss=[r.train_loss for r in reports],
                     epoch_seconds=[r.epoch_seconds for r in reports],
                     test_accuracy=result.test_accuracy,
                     seconds=time.perf_counter() - start)


class RunCache:
    """The runs of one study: read from `path` (JSON lines), extended as runs finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, RunRecord] = {}
        self.trained = 0  # runs this process trained (not read back)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = RunRecord(**json.loads(line))
                    self.records[record.key] = record

    def get(self, config: TrialConfig) -> RunRecord | None:
        return self.records.get(run_key(config))

    def run(self, config: TrialConfig, label: str = "") -> RunRecord:
        """The cached record of `config`, or train it now and append it to the file."""
        record = self.get(config)
        if record is not None:
            return record
        record = train(config)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(record), sort_keys=True) + "\n")
        self.records[record.key] = record
        self.trained += 1
        print(f"  trained {label or record.key}: {record.params:,} params, val "
              f"{record.val_accuracy[-1]:.3f}, test {record.test_accuracy:.3f}, "
              f"{record.seconds:.0f} s", file=sys.stderr, flush=True)
        return record
