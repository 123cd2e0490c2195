"""Early stopping that sees both objectives.

At each rung (epochs `grace · η^k` below the full budget) a trial goes on while no trial that
reached the same rung dominates it on (val_accuracy at the rung, exact params), within
`epsilon` in accuracy. Plain ASHA ranks accuracy alone, so it culls small adapters for
learning more slowly; here a small adapter survives unless something no larger is clearly
more accurate. A stopped trial is told to Optuna as pruned and never enters the front
(`pipeline.search`).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from pipeline.front import TrialPoint, dominates
from pipeline.space import EarlyStopping


def make_scheduler(early: EarlyStopping, epochs: int) -> TrialScheduler:
    """The Ray Tune scheduler a space's `early_stopping:` section asks for."""
    if early.mode == "pareto":
        return ParetoRungScheduler(early.rungs(epochs), epsilon=early.epsilon)
    if early.mode == "asha":  # metric set here only: TuneConfig stays two-objective
        return ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max",
                             max_t=epochs, grace_period=early.grace_epochs,
                             reduction_factor=early.reduction_factor,
                             stop_last_trials=False)  # else the last epoch's report is a STOP,
                                                      # before the trial's full-budget result
    return FIFOScheduler()


class ParetoRungScheduler(FIFOScheduler):
    """Asynchronous successive halving on Pareto dominance instead of a single metric."""

    def __init__(self, rungs: list[int], *, epsilon: float = 0.0) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.recorded: dict[int, list[TrialPoint]] = {rung: [] for rung in rungs}

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        return True  # the objectives are fixed: (val_accuracy max, params min)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        epoch = result.get("epoch")
        if epoch not in self.recorded or result.get("full_budget"):
            return TrialScheduler.CONTINUE
        point = TrialPoint(trial=hash(trial.trial_id), val_accuracy=result["val_accuracy"],
                           params=int(result["params"]))
        return self.decide(epoch, point)

    def decide(self, rung: int, point: TrialPoint) -> str:
        """Record `point` at `rung`; stop it if an earlier arrival dominates it."""
        peers = self.recorded[rung]
        peers.append(point)
        if any(dominates(other, point, self.epsilon) for other in peers if other is not point):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        sizes = {rung: len(points) for rung, points in self.recorded.items()}
        return f"ParetoRungScheduler: trials seen per rung {sizes}, epsilon {self.epsilon}"
