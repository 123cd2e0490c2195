"""Selection policies over a Pareto front: the choice, the tie-breaks, the refusals."""

import pytest

from pipeline.front import TrialPoint, pareto_front
from pipeline.policy import Policy, knee_distances, parse_policy, select


def point(trial, acc, params):
    # test accuracy deliberately ranks the other way: selection must never read it
    return TrialPoint(trial=trial, val_accuracy=acc, params=params, test_accuracy=1 - acc)


# log10 params 2, 3, 4, 5 → x 0, 1/3, 2/3, 1; accuracy → y 0, .83, .94, 1: trial 1 bulges most
CONCAVE = [point(0, 0.50, 100), point(1, 0.80, 1_000), point(2, 0.85, 10_000),
           point(3, 0.86, 100_000)]
# x 0, .25, .5, .75, 1 and y 0, .5, .75, .875, 1: trials 11 and 12 tie at distance .25/√2
TIED = [point(10, 0.50, 1), point(11, 0.70, 10), point(12, 0.80, 100), point(13, 0.85, 1_000),
        point(14, 0.90, 10_000)]
# accuracy gains accelerate with size: nothing lies above the chord
CONVEX = [point(20, 0.50, 100), point(21, 0.52, 1_000), point(22, 0.90, 10_000)]

CASES = [
    ("knee", CONCAVE, 1),
    ("knee", TIED, 12),  # tie: the more accurate
    ("knee", CONVEX, 22),  # no knee: the most accurate extreme
    ("knee", CONCAVE[:2], 1),  # two members: the more accurate
    ("knee", CONCAVE[:1], 0),
    ("max-accuracy", CONCAVE, 3),
    ("max-accuracy", [point(5, 0.9, 500), point(4, 0.9, 500), point(6, 0.9, 400)], 6),
    ("max-accuracy", [point(5, 0.9, 500), point(4, 0.9, 500)], 4),  # then the lower trial
    ("budget:10000", CONCAVE, 2),  # a budget equal to a member's size admits it
    ("budget:9999", CONCAVE, 1),
    ("budget:1,000,000", CONCAVE, 3),
    ("smallest-within:0.05", CONCAVE, 2),  # 0.85 ≥ 0.86 − 0.05; 0.80 is not
    ("smallest-within:0.1", CONCAVE, 1),
    ("smallest-within:0", CONCAVE, 3),
    ("smallest-within:0.5", CONCAVE, 0),
]


@pytest.mark.parametrize(("policy", "front", "expected"), CASES)
def test_policy_picks(policy, front, expected):
    assert select(front, parse_policy(policy)).trial == expected
    assert select(list(reversed(front)), parse_policy(policy)).trial == expected  # order-free


def test_knee_distance_is_signed_above_the_chord():
    distances = knee_distances(CONCAVE)
    assert distances[0] == pytest.approx(0) and distances[3] == pytest.approx(0)
    assert distances[1] > distances[2] > 0
    assert knee_distances(CONVEX)[21] < 0


def test_selection_reads_validation_accuracy_not_test_accuracy():
    front = pareto_front([point(0, 0.7, 10), point(1, 0.9, 100)])
    assert select(front, parse_policy("max-accuracy")).trial == 1  # the lower test accuracy


@pytest.mark.parametrize("text", ["knee", "max-accuracy", "budget:50000",
                                  "smallest-within:0.01"])
def test_policy_text_round_trips(text):
    assert str(parse_policy(text)) == text
    assert parse_policy(str(parse_policy(text))) == parse_policy(text)


def test_budget_is_kept_as_a_whole_count():
    assert parse_policy("budget:1_234_567") == Policy("budget", 1234567)
    assert str(parse_policy("budget:1_234_567")) == "budget:1234567"


BAD = [
    ("fastest", r"--policy 'fastest' is not a policy; valid forms: knee, max-accuracy, "
                r"budget:<params>, smallest-within:<delta>"),
    ("knee:3", r"is not a policy"),
    ("budget", r"is not a policy"),
    ("budget:lots", r"the budget must be a whole parameter count ≥ 0"),
    ("budget:-5", r"the budget must be a whole parameter count ≥ 0"),
    ("smallest-within:1.5", r"delta is a fraction of accuracy in \[0, 1\) \(0.01 = one point\)"),
    ("smallest-within:x", r"delta is a fraction of accuracy"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_policies_name_the_option_and_the_valid_forms(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(text)


def test_a_budget_below_every_member_says_how_far():
    with pytest.raises(ValueError, match=r"every front member is over the budget \(the smallest "
                                         r"has 100 params, trial 0\); raise the budget to at "
                                         r"least 100"):
        select(CONCAVE, parse_policy("budget:99"))


def test_an_empty_front_selects_nothing():
    with pytest.raises(ValueError, match="front is empty"):
        select([], parse_policy("knee"))
