"""Search efficiency: how much of the true Pareto front each strategy finds per epoch trained.

A tabular benchmark, as HPOBench and NAS-Bench do it:

1. Tabulate: every configuration of a small discrete space (`bench/spaces/efficiency.yaml`,
   48 configurations) is fine-tuned once at full budget with the project's own trial code
   (`pipeline.trial.run_trial`), recording its validation accuracy after every epoch, its
   adapter size and its test accuracy. The trial seed is fixed, so a configuration's curve
   is deterministic: the table is what any search would see for it.
2. Replay: each strategy is run against the table with the real Optuna samplers
   (`pipeline.search.SAMPLERS`, a two-objective study, define-by-run through
   `SpaceSampler.suggest` over the same space) and the real Ray Tune schedulers
   (`pipeline.stopping.make_scheduler`: the project's `ParetoRungScheduler`, Ray's
   `ASHAScheduler`, or none), fed one result per epoch. A stopped trial is told to Optuna
   as pruned and never enters the front; compute is charged in epochs actually trained.
   Trials run one after another: the asynchronous search is simulated sequentially.

Reported: the fraction of the true front's hypervolume reached against the fraction of the
exhaustive compute (every configuration at full budget once), over sampler seeds.

    python -m bench.search_efficiency            # the docs' setting: ~20 min of training once
    python -m bench.search_efficiency --quick    # 8 configs on digits, ~2 min; not for docs
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402

from bench.replay import Replays, Strategy, Table, run_replays, tabulate  # noqa: E402
from bench.report import (  # noqa: E402
    markdown_table,
    new_figure,
    replace_section,
    save_figure,
    write_csv,
)
from bench.runs import RESULTS_DIR, RunCache, add_common_options, apply_threads  # noqa: E402
from pipeline.front import TrialPoint, draw_front, plot_data  # noqa: E402
from pipeline.space import EarlyStopping, SpaceSampler, load_space  # noqa: E402

SPACES = Path(__file__).with_name("spaces")
REPO = Path(__file__).resolve().parent.parent
REPORT_AT = (0.10, 0.25, 0.50, 1.00)  # fractions of the exhaustive compute in the tables
GOAL_COMPUTE, GOAL_HV = 0.25, 0.95
CHECK_AT = tuple(i / 20 for i in range(1, 21))  # where "ahead at equal compute" is checked
LEVEL = 0.005  # hypervolume-fraction differences this small count as a tie


def describe(early: EarlyStopping) -> str:
    if early.mode == "none":
        return "no early stopping"
    rule = "Pareto rungs" if early.mode == "pareto" else "ASHA on accuracy"
    eps = f", ε {early.epsilon:g}" if early.mode == "pareto" else ""
    return f"{rule} (grace {early.grace_epochs}, η {early.reduction_factor}{eps})"


def strategies(default: EarlyStopping) -> list[Strategy]:
    """The alternatives the issue names, the project's default last."""
    asha = default.model_copy(update={"mode": "asha"})
    return [
        Strategy("exhaustive, random order", "random", EarlyStopping(mode="none"), True),
        Strategy("random search", "random", EarlyStopping(mode="none")),
        Strategy("Optuna TPE", "tpe", EarlyStopping(mode="none")),
        Strategy(f"Optuna TPE + {describe(asha)}", "tpe", asha),
        Strategy(f"Optuna TPE + {describe(default)} — project default", "tpe", default),
    ]


#: Other settings of the project's early stopping, replayed to see what would change.
VARIANTS = ({"epsilon": 0.01}, {"epsilon": 0.02}, {"epsilon": 0.05}, {"reduction_factor": 2},
            {"grace_epochs": 2, "reduction_factor": 2}, {"grace_epochs": 3})


def variants(default: EarlyStopping) -> list[Strategy]:
    tuned = [default.model_copy(update=change) for change in VARIANTS]
    no_repeats = [Strategy(f"what-if: Optuna TPE + {describe(e)}, no configuration trained "
                           "twice", "tpe", e, skip_seen=True) for e in (default, tuned[0])]
    return ([Strategy(f"random + {describe(default)}", "random", default)]
            + [Strategy(f"Optuna TPE + {describe(e)}", "tpe", e) for e in tuned] + no_repeats)

def _report_at(replays: Replays) -> list[float]:
    """The REPORT_AT points within the compute the replays were given."""
    return [f for f in REPORT_AT if f <= replays.budget_fraction]


def mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _behind(default: Replays, other: Replays, table: Table) -> str:
    """Where `other` is ahead of `default` on the mean over seeds; "" when nowhere."""
    gaps = [(f, statistics.mean(other.at(f, table)) - statistics.mean(default.at(f, table)))
            for f in CHECK_AT]
    worse = [(f, gap) for f, gap in gaps if gap > LEVEL]
    if not worse:
        return ""
    return (f"{other.strategy.name} at {', '.join(f'{f:.0%}' for f, _ in worse)} of compute "
            f"(by up to {max(g for _, g in worse):.3f})")


def goal_verdict(results: list[Replays], table: Table) -> str:
    """Whether the default (last strategy) meets the issue's goal, said plainly."""
    *others, default = results
    reached = statistics.mean(default.at(GOAL_COMPUTE, table))
    lines = [f"- Project default at {GOAL_COMPUTE:.0%} of the exhaustive compute: "
             f"**{reached:.1%}** of the true hypervolume (mean of {len(default.runs)} seeds; "
             f"worst seed {min(default.at(GOAL_COMPUTE, table)):.1%}); goal ≥ {GOAL_HV:.0%}: "
             f"**{'met' if reached >= GOAL_HV else 'not met'}**."]
    check = ("checked every 5 % of compute on the means over seeds, differences up to "
             f"{LEVEL} counted as level")
    behind = [b for r in others if not r.strategy.exhaustive if (b := _behind(default, r, table))]
    lines.append(f"- Ahead of every alternative at equal compute ({check}): "
                 + (f"**no**: behind {'; '.join(behind)}." if behind else "**yes**."))
    for reference in (r for r in others if r.strategy.exhaustive):
        behind_reference = _behind(default, reference, table)
        lines.append(f"- Against the reference \"{reference.strategy.name}\": "
                     + (f"behind {behind_reference}." if behind_reference else "never behind."))
    return "\n".join(lines)


def summary_rows(results: list[Replays], table: Table) -> list[dict]:
    rows = []
    for r in results:
        for fraction in _report_at(r):
            values = r.at(fraction, table)
            counts = r.trials_within(fraction, table)
            rows.append({"strategy": r.strategy.name, "compute_fraction": fraction,
                         "hv_fraction_mean": round(statistics.mean(values), 4),
                         "hv_fraction_std": round(statistics.stdev(values), 4)
                         if len(values) > 1 else 0.0,
                         "hv_fraction_min": round(min(values), 4),
                         "trials_started": round(counts.started, 1),
                         "share_stopped": round(counts.stopped, 3),
                         "share_repeats": round(counts.repeats, 3),
                         "seeds": len(values)})
    return rows


def strategy_table(results: list[Replays], table: Table) -> str:
    """HV fraction (mean ± std over seeds) at the compute points every run reached."""
    report_at = min((_report_at(r) for r in results), key=len)
    header = ["strategy", *(f"HV at {f:.0%} compute" for f in report_at),
              f"trials by {GOAL_COMPUTE:.0%}", "of them stopped early", "of them repeats"]
    rows = []
    for r in results:
        counts = r.trials_within(GOAL_COMPUTE, table)
        rows.append([r.strategy.name, *(mean_std(r.at(f, table)) for f in report_at),
                     f"{counts.started:.1f}", f"{counts.stopped:.0%}", f"{counts.repeats:.0%}"])
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


def plot_curves(results: list[Replays], table: Table, path: Path) -> Path:
    fig, ax = new_figure(figsize=(7, 5.5), dpi=120)
    grid = [i / 100 for i in range(101)]
    for r in results:
        per_seed = [r.at(f, table) for f in grid]
        mean = [statistics.mean(v) for v in per_seed]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed]
        line, = ax.plot(grid, mean, label=r.strategy.name,
                        linestyle="--" if r.strategy.exhaustive else "-")
        ax.fill_between(grid, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.12)
    ax.axhline(GOAL_HV, color="gray", linewidth=0.8, linestyle=":")
    ax.axvline(GOAL_COMPUTE, color="gray", linewidth=0.8, linestyle=":")
    ax.set(xlabel="compute spent (fraction of the exhaustive epochs)",
           ylabel="fraction of the true hypervolume", ylim=(0, 1.02), xlim=(0, 1),
           title=f"{len(results[0].runs)} seeds, mean ± std")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    return save_figure(fig, path)


def table_rows(table: Table) -> list[dict]:
    rows = []
    for key, r in table.records.items():
        adapter = r.config["adapter"]
        rows.append({"key": key, "num_kernels": adapter["num_kernels"],
                     "factor": "x".join(map(str, adapter["factor"])), "rank": adapter["rank"],
                     "rescale": adapter["rescale"], "params": r.params,
                     "val_accuracy": round(r.val_accuracy[-1], 4),
                     "val_curve": " ".join(f"{v:.3f}" for v in r.val_accuracy),
                     "test_accuracy": round(r.test_accuracy, 4),
                     "seconds": round(r.seconds, 1)})
    return sorted(rows, key=lambda row: row["params"])


def report(table: Table, main: list[Replays], extra: list[Replays], docs: Path,
           space_file: Path) -> None:
    """The CSVs, the figures and the study's section of `docs/benchmarks.md`."""
    figures, tables = docs / "figures", docs / "tables"
    write_csv(tables / "search_efficiency.csv", summary_rows(main + extra, table))
    write_csv(tables / "search_efficiency_table.csv", table_rows(table))
    plot_curves(main, table, figures / "search_efficiency.png")
    points = [TrialPoint(i, r.val_accuracy[-1], r.params, test_accuracy=r.test_accuracy)
              for i, r in enumerate(table.records.values())]
    draw_front(plot_data(points), figures / "search_efficiency_front.png",
               title=f"{len(points)} configurations at full budget")
    minutes = sum(r.seconds for r in table.records.values()) / 60
    front = ", ".join(f"{p.params:,} params → {p.val_accuracy:.1%}" for p in table.true_front)
    body = f"""\
Generated by `python -m bench.search_efficiency` from `{_shown(space_file)}`:
{len(table.records)} configurations × {table.epochs} epochs, exhaustive compute
{table.exhaustive_epochs} epochs; training the table took {minutes:.0f} min of wall time
(sum over runs, as recorded; the machine may have been shared). True front
({len(table.true_front)} configurations, validation accuracy): {front}.
Hypervolume {table.true_hv:.4f} in (accuracy, log10 params), reference
(accuracy {table.reference.accuracy:g}, {table.reference.params:,} params).
{len(main[0].runs)} sampler seeds per strategy.

{strategy_table(main, table)}

{goal_verdict(main, table)}

![hypervolume fraction against compute](figures/search_efficiency.png)

![the tabulated configurations and their true front](figures/search_efficiency_front.png)

Other settings of the project's early stopping, same table, same seeds:

{strategy_table(extra, table)}

Per-strategy figures: `docs/tables/search_efficiency.csv`; the table itself:
`docs/tables/search_efficiency_table.csv` (raw curves: `bench/results/`)."""
    replace_section(docs / "benchmarks.md", "search_efficiency", body)


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser, "8 configurations on digits, 4 epochs (~2 min); writes under "
                               "bench/results/quick/, never into docs/")
    parser.add_argument("--space", type=Path, help="a discrete search space (YAML)")
    parser.add_argument("--seeds", type=int, default=10, help="sampler seeds per strategy")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    quick_dir = RESULTS_DIR / "quick"
    space_file = args.space or SPACES / ("efficiency_quick.yaml" if args.quick
                                         else "efficiency.yaml")
    results = args.results or (quick_dir if args.quick else RESULTS_DIR) / "search_table.jsonl"
    docs = args.docs or (quick_dir / "docs" if args.quick else REPO / "docs")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    space = load_space(space_file)
    sampler = SpaceSampler(space)
    table = tabulate(sampler, RunCache(results))
    seeds = range(args.seeds)
    main_results = [run_replays(s, seeds, table, sampler) for s in strategies(space.early_stopping)]
    extra = [run_replays(s, seeds, table, sampler, budget_fraction=0.5)
             for s in variants(space.early_stopping)]
    report(table, main_results, extra, docs, space_file)
    print(strategy_table(main_results, table))
    print(goal_verdict(main_results, table))
    print(f"written: {docs / 'benchmarks.md'}, {docs / 'figures'}, {docs / 'tables'}")


if __name__ == "__main__":
    main()
