"""KARST against its peers on the built-in tasks, at roughly matched adapter sizes.

Methods: linear probe (head only), full fine-tuning, LoRA (the rank whose count is closest
to the KARST rows' median), LoKr (KARST with one kernel and no re-scaling: the same run as
that KARST row), re-scaling only (SSF-style, per channel), and KARST with N kernels ×
re-scaling mode (channel, scalar, none). KARST keeps N · r fixed at factor 4, so the
kernel count changes the adapter's structure, not its budget; alpha = 2 · rank for every
low-rank adapter (the same scale 2 everywhere).

Learning rate: one per method family (linear, full, lora, ssf, karst), the best validation
accuracy among `lrs` for the family member of median size on seed 0 of the first task,
then fixed for every seed and task. Each run is the project's own trial code; the score is
the test accuracy after the last epoch, mean ± std over seeds (a seed draws the
train/val/test split, the initialisation and the batch order).

    python -m bench.peers            # the docs' setting: 87 fine-tunes, ~30 min on 2 cores alone
    python -m bench.peers --quick    # digits, 2 seeds, a few methods, ~3 min; not for docs
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.peer_runs import (  # noqa: E402
    FULL,
    MIN_EFFECT,
    QUICK,
    Effect,
    Row,
    Settings,
    effects,
    run_study,
)
from bench.report import (  # noqa: E402
    markdown_table,
    new_figure,
    replace_section,
    save_figure,
    write_csv,
)
from bench.runs import RESULTS_DIR, RunCache, add_common_options, apply_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _said(effects: list[Effect]) -> str:
    verdicts = {e.verdict() for e in effects}
    if verdicts == {"helps"}:
        return "better"
    if verdicts == {"hurts"}:
        return "worse"
    if verdicts <= {"no clear difference", "one seed: no verdict"}:
        return "no clear difference"
    return "mixed"


def _figures(effects: list[Effect]) -> str:
    return "; ".join(f"{e.task}, {e.what.split(' (mean over')[0]}: {100 * e.mean:+.1f} ± "
                     f"{100 * e.std:.1f} points" for e in effects)


def plain_summary(found: list[Effect]) -> str:
    """The answer to "do multi-kernels and re-scaling help here?", from the effects."""
    groups = {"Multi-kernels (N > 1 against N 1, same N · r and re-scaling)":
              [e for e in found if e.what.startswith("N ")],
              "Re-scaling transmission (against none, same N)":
              [e for e in found if e.what.startswith("re-scaling")],
              "The best KARST row (chosen on validation) against LoRA at matched size":
              [e for e in found if "vs LoRA" in e.what],
              "The best KARST row against LoKr (KARST's N 1, no re-scaling case)":
              [e for e in found if "vs LoKr" in e.what]}
    return "\n".join(f"- {what}: **{_said(effects)}** here ({_figures(effects)})."
                      for what, effects in groups.items() if effects)


def _pct(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def results_table(rows: list[Row], task: str) -> str:
    header = ["method", "adapter params", "lr", "test accuracy %", "val accuracy %"]
    body = [[r.method.label, f"{r.params:,}", f"{r.lr:g}", _pct(r.test), _pct(r.val)]
            for r in sorted((r for r in rows if r.task == task), key=lambda r: r.params)]
    return markdown_table(header, body, "lrrrr")


def effects_table(found: list[Effect]) -> str:
    header = ["task", "comparison", "test accuracy difference (points)", "verdict"]
    body = [[e.task, e.what, f"{100 * e.mean:+.1f} ± {100 * e.std:.1f}", e.verdict()]
            for e in found]
    return markdown_table(header, body, "llrl")


STYLE = {"linear": ("tab:gray", "s"), "full": ("black", "D"), "lora": ("tab:green", "^"),
         "ssf": ("tab:brown", "v"), "lokr": ("tab:purple", "P")}
RESCALE_COLOURS = {"channel": "tab:red", "scalar": "tab:orange", "none": "tab:blue"}


def plot(rows: list[Row], settings: Settings, path: Path) -> Path:
    """Test accuracy against adapter size (log), one panel per task; the linear probe, with
    no adapter parameters, is a horizontal band."""
    tasks = list(settings.epochs)
    fig, axes = new_figure(ncols=len(tasks), figsize=(6 * len(tasks), 5), dpi=120,
                           squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in rows if r.task == task):
            _draw(ax, r)
        ax.set_xscale("log")
        ax.set(xlabel="trainable adapter parameters (head excluded)",
               ylabel="test accuracy % (mean ± std)",
               title=f"{task}: {settings.epochs[task]} epochs, {len(settings.seeds)} seeds")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="center right")
    return save_figure(fig, path)


def _draw(ax: Any, row: Row) -> None:
    mean = 100 * statistics.mean(row.test)
    std = 100 * statistics.stdev(row.test) if len(row.test) > 1 else 0.0
    if row.params == 0:
        colour = STYLE[row.method.kind][0]
        ax.axhline(mean, color=colour, linestyle="--", linewidth=1, label=_legend_label(row))
        ax.axhspan(mean - std, mean + std, color=colour, alpha=0.1)
        return
    if row.method.kind == "karst":
        colour, marker = RESCALE_COLOURS[row.method.adapter["rescale"]], "o"
        ax.annotate(f"N{row.method.adapter['num_kernels']}", (row.params, mean), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    else:
        colour, marker = STYLE[row.method.kind]
    ax.errorbar(row.params, mean, yerr=std, fmt=marker, color=colour, capsize=2,
                markersize=5, label=_legend_label(row))


def _legend_label(row: Row) -> str:
    if row.method.kind == "karst":
        return f"KARST, re-scaling {row.method.adapter['rescale']}"
    if row.method.kind == "lokr":
        return "LoKr (the KARST N 1, none runs: same point)"
    return row.method.label


def table_rows(rows: list[Row]) -> list[dict[str, Any]]:
    return [{"task": r.task, "method": r.method.label, "family": r.method.family,
             "params": r.params, "lr": r.lr, "seeds": len(r.records),
             "test_mean": round(statistics.mean(r.test), 4),
             "test_std": round(statistics.stdev(r.test), 4) if len(r.test) > 1 else 0.0,
             "val_mean": round(statistics.mean(r.val), 4),
             "test_per_seed": " ".join(f"{t:.4f}" for t in r.test)} for r in rows]


def _edge_note(lrs: dict[str, float], settings: Settings) -> str:
    """Families whose best lr is the largest or smallest tried: their optimum may lie beyond."""
    edge = [f for f, lr in lrs.items() if lr in (min(settings.lrs), max(settings.lrs))]
    if not edge or len(settings.lrs) < 2:
        return ""
    return f" ({', '.join(edge)} at the edge of the grid: their best lr may lie beyond it)"


def _grid_note(settings: Settings, task: str) -> str:
    if task not in settings.reduced:
        return ""
    kernels, rescales = settings.karst_grid(task)
    return (f"; KARST N ∈ {{{', '.join(map(str, kernels))}}} × re-scaling "
            f"{{{', '.join(rescales)}}} only")


def report(rows: list[Row], settings: Settings, docs: Path) -> None:
    write_csv(docs / "tables" / "peers.csv", table_rows(rows))
    plot(rows, settings, docs / "figures" / "peers.png")
    found = effects(rows, settings)
    minutes = sum(rec.seconds for r in rows for rec in r.records) / 60
    lrs = {r.method.family: r.lr for r in rows}
    tasks = "\n\n".join(f"**{task}** ({settings.epochs[task]} epochs, seeds "
                        f"{', '.join(map(str, settings.seeds))}{_grid_note(settings, task)}):"
                        f"\n\n{results_table(rows, task)}" for task in settings.epochs)
    body = f"""\
Generated by `python -m bench.peers`: {len(rows)} method × task rows, {len(settings.seeds)}
seeds each; the runs in the tables took {minutes:.0f} min of wall time (sum over runs, as
recorded; the machine may have been shared). Learning rate per family, chosen on seed
{settings.seeds[0]} of {next(iter(settings.epochs))} from {list(settings.lrs)}:
{", ".join(f"{family} {lr:g}" for family, lr in lrs.items())}{_edge_note(lrs, settings)}.

{tasks}

![test accuracy against adapter parameters](figures/peers.png)

Paired by seed (same split, same initialisation), difference of test accuracy in points,
mean ± std over seeds; "helps"/"hurts" when the mean is beyond two standard errors and at
least {100 * MIN_EFFECT:g} point, "no clear difference" otherwise:

{effects_table(found)}

In plain words (the paper reports that both multi-kernels and re-scaling help on VTAB-1K):

{plain_summary(found)}

All rows: `docs/tables/peers.csv`; raw runs: `bench/results/peers.jsonl`."""
    replace_section(docs / "benchmarks.md", "peers", body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser, "digits, 2 seeds, 3 epochs, a few methods (~3 min); writes "
                               "under bench/results/quick/, never into docs/")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    settings = QUICK if args.quick else FULL
    out = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    cache = RunCache(args.results or out / "peers.jsonl")
    docs = args.docs or (out / "docs" if args.quick else REPO / "docs")
    rows = run_study(settings, cache)
    report(rows, settings, docs)
    for task in settings.epochs:
        print(f"{task}:\n{results_table(rows, task)}\n")
    print(effects_table(effects(rows, settings)))
    print(f"trained {cache.trained} runs; written: {docs / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
