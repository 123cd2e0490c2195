"""Pick one member of a search's Pareto front by a named, recorded policy.

Selection reads validation accuracy and parameter count only: test accuracy is reported
with a promotion, never used to choose one (choosing on it would make it a second
validation set and its figure optimistic).

Every policy breaks ties the same way: higher validation accuracy, then fewer parameters,
then the lower trial number, so the same front always gives the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.front import TrialPoint

KNEE, MAX_ACCURACY, BUDGET, SMALLEST_WITHIN = "knee", "max-accuracy", "budget", "smallest-within"
POLICY_FORMS = (KNEE, MAX_ACCURACY, f"{BUDGET}:<params>", f"{SMALLEST_WITHIN}:<delta>")


@dataclass(frozen=True)
class Policy:
    """A parsed `--policy`: its name and, for `budget` / `smallest-within`, its value."""

    name: str
    value: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.name
        value = str(int(self.value)) if self.name == BUDGET else f"{self.value:g}"
        return f"{self.name}:{value}"


def parse_policy(text: str) -> Policy:
    """`knee`, `max-accuracy`, `budget:50000` or `smallest-within:0.01` → a `Policy`.

    Raises `ValueError` naming `--policy`, the value and the valid forms.
    """
    name, sep, raw = text.strip().partition(":")
    valid = f"valid forms: {', '.join(POLICY_FORMS)}"
    if name in (KNEE, MAX_ACCURACY) and not sep:
        return Policy(name)
    if name == BUDGET and sep:
        try:
            budget = int(raw.replace(",", "").replace("_", ""))
        except ValueError:
            budget = -1
        if budget < 0:
            raise ValueError(f"--policy {text!r}: the budget must be a whole parameter count "
                             "≥ 0, e.g. budget:50000")
        return Policy(BUDGET, budget)
    if name == SMALLEST_WITHIN and sep:
        try:
            delta = float(raw)
        except ValueError:
            delta = math.nan
        if not 0 <= delta < 1:
            raise ValueError(f"--policy {text!r}: delta is a fraction of accuracy in [0, 1) "
                             "(0.01 = one point), e.g. smallest-within:0.01")
        return Policy(SMALLEST_WITHIN, delta)
    raise ValueError(f"--policy {text!r} is not a policy; {valid}")


def _preference(point: TrialPoint) -> tuple[float, int, int]:
    """The shared tie-break, as a key to minimise: accuracy ↓, params ↑, trial ↑."""
    return (-point.val_accuracy, point.params, point.trial)


def select(front: Sequence[TrialPoint], policy: Policy) -> TrialPoint:
    """The front member `policy` picks; `ValueError` if the front is empty or none qualifies."""
    if not front:
        raise ValueError("the search's front is empty: no trial completed its full budget")
    if policy.name == KNEE:
        distance = knee_distances(front)
        return min(front, key=lambda p: (-round(distance[p.trial], 12), *_preference(p)))
    if policy.name == MAX_ACCURACY:
        return min(front, key=_preference)
    if policy.name == BUDGET:
        within = [p for p in front if p.params <= policy.value]
        if not within:
            smallest = min(front, key=lambda p: p.params)
            raise ValueError(f"--policy {policy}: every front member is over the budget (the "
                             f"smallest has {smallest.params:,} params, trial {smallest.trial});"
                             f" raise the budget to at least {smallest.params}")
        return min(within, key=_preference)
    if policy.name == SMALLEST_WITHIN:
        best = max(p.val_accuracy for p in front)
        near = [p for p in front if p.val_accuracy >= best - policy.value]
        return min(near, key=lambda p: (p.params, *_preference(p)))
    raise ValueError(f"unknown policy {policy.name!r}; valid forms: {', '.join(POLICY_FORMS)}")


def knee_distances(front: Sequence[TrialPoint]) -> dict[int, float]:
    """Each member's signed distance above the chord joining the front's two extremes.

    Measured in (log10 params, val accuracy), each scaled to [0, 1] over the front: the
    plane the hypervolume uses, so a knee does not depend on the units. Only members above
    the chord bulge towards the ideal corner (small and accurate); one below it is the
    worst trade-off, not a knee, so the distance is signed rather than absolute. Where
    nothing lies above the chord (one or two members, or a convex front), every distance
    is ≤ 0 and the shared tie-break picks the most accurate extreme.
    """
    xs = [math.log10(max(p.params, 1)) for p in front]
    ys = [p.val_accuracy for p in front]
    x_min, x_span = min(xs), (max(xs) - min(xs)) or 1.0
    y_min, y_span = min(ys), (max(ys) - min(ys)) or 1.0
    # On a front the smallest member is the least accurate, so the extremes map to (0, 0)
    # and (1, 1) and the chord is y = x.
    return {p.trial: ((y - y_min) / y_span - (x - x_min) / x_span) / math.sqrt(2)
            for p, x, y in zip(front, xs, ys, strict=True)}
