"""The Pareto front of accuracy (max) against trainable parameters (min), and its hypervolume.

Pure functions over `TrialPoint`s: the search computes the front from complete, full-budget
trials only (a trial stopped early or failed is shown, never on the front); the same
dominance test, with an epsilon, decides which trials survive an early-stopping rung.

Hypervolume is measured in (accuracy, log10 params): parameter counts span orders of
magnitude, and in raw counts the largest adapters would own almost all of the area.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"


@dataclass(frozen=True)
class TrialPoint:
    trial: int
    val_accuracy: float
    params: int
    state: str = COMPLETE
    test_accuracy: float | None = None
    config: dict[str, Any] = field(default_factory=dict)


def dominates(a: TrialPoint, b: TrialPoint, epsilon: float = 0.0) -> bool:
    """`a` is no larger than `b`, at least `epsilon` more accurate, and better in one of the
    two; epsilon 0 is plain Pareto dominance."""
    no_worse = a.params <= b.params and a.val_accuracy >= b.val_accuracy + epsilon
    better = a.params < b.params or a.val_accuracy > b.val_accuracy + epsilon
    return no_worse and better


def non_dominated(points: Sequence[TrialPoint], epsilon: float = 0.0) -> list[TrialPoint]:
    """The points no other point dominates (by more than `epsilon` in accuracy), in order.

    With epsilon > 0 this keeps points within epsilon of the front: the early-stopping rule,
    so that small adapters are not culled for learning more slowly.
    """
    return [p for p in points if not any(dominates(q, p, epsilon) for q in points if q is not p)]


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """Front of the complete trials, smallest first; ties broken by trial number."""
    complete = sorted((p for p in points if p.state == COMPLETE),
                      key=lambda p: (p.params, -p.val_accuracy, p.trial))
    front: list[TrialPoint] = []
    for point in complete:
        if not front or point.val_accuracy > front[-1].val_accuracy:
            front.append(point)
    return front


class Reference(NamedTuple):
    """The hypervolume's reference point: worst accuracy and largest parameter count."""

    accuracy: float
    params: int


def default_reference(max_params: int) -> Reference:
    return Reference(accuracy=0.0, params=max(2, int(max_params * 1.1)))


def hypervolume(front: Sequence[TrialPoint], reference: Reference) -> float:
    """Area dominated by `front` up to `reference`, in (accuracy, log10 params).

    Sweep from the smallest adapter up: between one point's size and the next, the area
    is covered up to the best accuracy seen so far.
    """
    inside = sorted((p for p in front
                     if p.params < reference.params and p.val_accuracy > reference.accuracy),
                    key=lambda p: p.params)
    edges = [math.log10(max(p.params, 1)) for p in inside] + [math.log10(reference.params)]
    area, best = 0.0, reference.accuracy
    for i, point in enumerate(inside):
        best = max(best, point.val_accuracy)
        area += (best - reference.accuracy) * (edges[i + 1] - edges[i])
    return area


def hypervolume_history(points: Sequence[TrialPoint], reference: Reference) -> list[float]:
    """Hypervolume of the front after each trial, in the order the trials finished."""
    return [hypervolume(pareto_front(points[:i + 1]), reference) for i in range(len(points))]


FRONT_FIELDS = ("trial", "val_accuracy", "test_accuracy", "params", "config")


def write_front(front: Sequence[TrialPoint], directory: Path) -> tuple[Path, Path]:
    """`pareto_front.csv` (config as JSON in one column) and `pareto_front.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{k: asdict(p)[k] for k in FRONT_FIELDS} for p in front]
    json_path = directory / "pareto_front.json"
    json_path.write_text(json.dumps(rows, indent=2, sort_keys=True))
    csv_path = directory / "pareto_front.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRONT_FIELDS)
        writer.writeheader()
        writer.writerows({**r, "config": json.dumps(r["config"], sort_keys=True)} for r in rows)
    return csv_path, json_path


class PlotData(NamedTuple):
    """What the Pareto plot shows, gathered apart from the drawing (and tested)."""

    complete: list[tuple[int, float]]
    stopped: list[tuple[int, float]]
    front: list[tuple[int, float]]


def plot_data(points: Sequence[TrialPoint]) -> PlotData:
    def xy(ps: Sequence[TrialPoint]) -> list[tuple[int, float]]:
        return [(p.params, p.val_accuracy) for p in ps]

    return PlotData(xy([p for p in points if p.state == COMPLETE]),
                    xy([p for p in points if p.state == STOPPED]), xy(pareto_front(points)))


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path) -> Path:  # noqa: ANN001
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def draw_front(data: PlotData, path: Path, title: str = "") -> Path:
    """Accuracy against parameters (log x): all trials, stopped ones hollow, front joined."""
    fig, ax = _pyplot().subplots(figsize=(6, 4), dpi=120)
    for points, style in ((data.complete, dict(color="tab:blue", label="complete")),
                          (data.stopped, dict(facecolors="none", edgecolors="tab:gray",
                                              label="stopped early"))):
        if points:
            ax.scatter(*zip(*points, strict=True), s=24, **style)
    if data.front:
        ax.step(*zip(*data.front, strict=True), where="post", color="tab:red", zorder=3)
        ax.scatter(*zip(*data.front, strict=True), s=40, color="tab:red", zorder=4,
                   label="Pareto front")
    ax.set(xscale="log", xlabel="trainable adapter parameters", ylabel="validation accuracy",
           title=title)
    ax.legend(loc="lower right")
    return _save(fig, ax, path)


def draw_hypervolume(history: Sequence[float], reference: Reference, path: Path,
                     title: str = "") -> Path:
    """The front's hypervolume after each finished trial: where the search stopped paying."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(history) + 1), history, marker="o", markersize=3)
    ax.set(xlabel="trials finished", ylabel="hypervolume (accuracy × log10 params)",
           title=f"{title} (reference: accuracy {reference.accuracy:g}, "
                 f"{reference.params:,} params)".strip())
    return _save(fig, ax, path)
