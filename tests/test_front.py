"""The Pareto front, the epsilon rule for early stopping, hypervolume and the front's files."""

import csv
import json
import math

import pytest

from pipeline.front import (
    COMPLETE,
    FAILED,
    STOPPED,
    Reference,
    TrialPoint,
    default_reference,
    draw_front,
    draw_hypervolume,
    hypervolume,
    hypervolume_history,
    non_dominated,
    pareto_front,
    plot_data,
    write_front,
)


def point(trial, acc, params, state=COMPLETE):
    return TrialPoint(trial=trial, val_accuracy=acc, params=params, state=state,
                      test_accuracy=acc - 0.01, config={"adapter": {"rank": trial}})


POINTS = [
    point(0, 0.70, 1_000),
    point(1, 0.80, 10_000),
    point(2, 0.75, 20_000),  # dominated by 1
    point(3, 0.90, 100_000),
    point(4, 0.95, 500, STOPPED),  # truncated: better than everything, must not count
    point(5, 0.99, 100, FAILED),
    point(6, 0.80, 10_000),  # ties trial 1: the lower trial number wins
]


def test_front_holds_complete_non_dominated_trials_smallest_first():
    assert [p.trial for p in pareto_front(POINTS)] == [0, 1, 3]


def test_early_stopped_and_failed_trials_never_enter_the_front():
    front = pareto_front(POINTS)
    assert all(p.state == COMPLETE for p in front)
    assert 4 not in {p.trial for p in front} and 5 not in {p.trial for p in front}


def test_epsilon_keeps_slow_learners_near_the_front():
    rung = [point(0, 0.60, 1_000), point(1, 0.62, 1_000), point(2, 0.50, 50_000)]
    assert [p.trial for p in non_dominated(rung)] == [1]
    assert [p.trial for p in non_dominated(rung, epsilon=0.05)] == [0, 1]
    big = [point(0, 0.40, 500), point(1, 0.70, 80_000)]
    assert [p.trial for p in non_dominated(big)] == [0, 1]  # smaller but worse: both stay


def test_hypervolume_is_the_dominated_area_in_log_params():
    reference = Reference(accuracy=0.0, params=10_000)
    single = [point(0, 0.5, 100)]
    assert hypervolume(single, reference) == pytest.approx(0.5 * 2.0)  # log10(1e4) - log10(1e2)
    two = [point(0, 0.5, 100), point(1, 0.8, 1_000)]
    assert hypervolume(two, reference) == pytest.approx(0.8 * 1.0 + 0.5 * 1.0)
    assert hypervolume([point(0, 0.9, 20_000)], reference) == 0.0  # beyond the reference


def test_hypervolume_history_never_decreases():
    reference = Reference(0.0, 200_000)
    history = hypervolume_history([p for p in POINTS], reference)
    assert len(history) == len(POINTS)
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] == pytest.approx(hypervolume(pareto_front(POINTS), reference))
    assert history[-1] > 0 and math.isfinite(history[-1])


def test_front_files_hold_config_and_both_accuracies(tmp_path):
    csv_path, json_path = write_front(pareto_front(POINTS), tmp_path)
    rows = json.loads(json_path.read_text())
    assert [r["trial"] for r in rows] == [0, 1, 3]
    assert rows[1] == {"trial": 1, "val_accuracy": 0.8, "test_accuracy": pytest.approx(0.79),
                       "params": 10_000, "config": {"adapter": {"rank": 1}}}
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["params"]) for r in table] == [1_000, 10_000, 100_000]
    assert json.loads(table[2]["config"]) == {"adapter": {"rank": 3}}


def test_plot_shows_all_trials_with_stopped_ones_apart(tmp_path):
    data = plot_data(POINTS)
    assert len(data.complete) == 5 and data.stopped == [(500, 0.95)]
    assert data.front == [(1_000, 0.70), (10_000, 0.80), (100_000, 0.90)]
    path = draw_front(data, tmp_path / "pareto.png", title="demo")
    assert path.stat().st_size > 1_000


def test_hypervolume_history_is_drawn_with_its_reference(tmp_path):
    reference = default_reference(100_000)
    history = hypervolume_history(POINTS, reference)
    path = draw_hypervolume(history, reference, tmp_path / "hv.png", title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1_000
