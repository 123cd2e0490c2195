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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import karst  # noqa: E402
from bench.report import (  # noqa: E402
    markdown_table,
    new_figure,
    replace_section,
    save_figure,
    write_csv,
)
from bench.runs import (  # noqa: E402
    RESULTS_DIR,
    RunCache,
    RunRecord,
    add_common_options,
    apply_threads,
)
from pipeline.backbones import create_model_skeleton  # noqa: E402
from pipeline.config import BackboneConfig, TrialConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIN_EFFECT = 0.005  # accuracy differences below half a point are not called an effect


@dataclass(frozen=True)
class Method:
    label: str
    family: str  # methods of a family share one learning rate
    adapter: dict[str, Any]

    @property
    def kind(self) -> str:
        """The adapter method as given: karst, lokr, lora, ssf, linear or full."""
        return self.adapter["method"]


@dataclass(frozen=True)
class Settings:
    epochs: dict[str, int]  # built-in task → epochs; the first task also picks the lrs
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # candidates, one chosen per method family
    kernels: tuple[int, ...] = (1, 2, 4, 8)
    rescales: tuple[str, ...] = ("channel", "scalar", "none")
    baselines: tuple[str, ...] = ("linear", "full", "lora", "lokr", "ssf")
    factor: int = 4
    kernel_rank: int = 8  # N · r of every KARST row
    train_size: int = 800
    val_size: int = 200
    batch_size: int = 32
    #: tasks that run only part of the KARST grid: task → (kernels, rescales)
    reduced: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = field(default_factory=dict)

    def karst_grid(self, task: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return self.reduced.get(task, (self.kernels, self.rescales))

    def runs_on(self, method: Method, task: str) -> bool:
        if method.kind != "karst":
            return True
        kernels, rescales = self.karst_grid(task)
        return (method.adapter["num_kernels"] in kernels
                and method.adapter["rescale"] in rescales)


FULL = Settings(epochs={"mnist": 12, "digits": 10}, seeds=(0, 1, 2),
                lrs=(3e-4, 1e-3, 3e-3, 1e-2), reduced={"digits": ((1, 8), ("channel", "none"))})
QUICK = Settings(epochs={"digits": 3}, seeds=(0, 1), lrs=(3e-3,), kernels=(1, 4),
                 rescales=("channel", "none"), baselines=("linear", "lora", "lokr"))


def karst_methods(settings: Settings) -> list[Method]:
    methods = []
    for n in settings.kernels:
        if settings.kernel_rank % n:
            raise ValueError(f"kernels: N={n} does not divide kernel_rank="
                             f"{settings.kernel_rank} (N · r is kept fixed); use divisors")
        rank = settings.kernel_rank // n
        for rescale in settings.rescales:
            methods.append(Method(f"KARST N {n}, r {rank}, {rescale}", "karst",
                                  {"method": "karst", "num_kernels": n,
                                   "factor": settings.factor, "rank": rank,
                                   "alpha": 2.0 * rank, "rescale": rescale,
                                   "init": "kaiming"}))
    return methods


def matched_lora_rank(skeleton: Any, counts: Sequence[int], max_rank: int = 64) -> int:
    """The LoRA rank whose adapter count is closest to the median of `counts`."""
    target = statistics.median(counts)
    return min(range(1, max_rank + 1),
               key=lambda r: abs(karst.param_count(skeleton, karst.LoraConfig(rank=r)) - target))


def baseline_methods(settings: Settings, skeleton: Any, karst_rows: list[Method]) -> list[Method]:
    r = settings.kernel_rank
    lokr = {"method": "lokr", "factor": settings.factor, "rank": r, "alpha": 2.0 * r,
            "init": "kaiming"}
    counts = [count(skeleton, m.adapter) for m in karst_rows] or [count(skeleton, lokr)]
    lora_rank = matched_lora_rank(skeleton, counts)
    known = {
        "linear": Method("linear probe (head only)", "linear", {"method": "linear"}),
        "full": Method("full fine-tuning", "full", {"method": "full"}),
        "lora": Method(f"LoRA r {lora_rank}", "lora",
                       {"method": "lora", "rank": lora_rank, "alpha": 2.0 * lora_rank}),
        "lokr": Method(f"LoKr f {settings.factor}, r {r} (= KARST N 1, none)", "karst", lokr),
        "ssf": Method("re-scaling only (SSF, channel)", "ssf",
                      {"method": "ssf", "rescale": "channel"}),
    }
    unknown = set(settings.baselines) - set(known)
    if unknown:
        raise ValueError(f"baselines {sorted(unknown)} unknown; valid: {list(known)}")
    return [known[name] for name in settings.baselines]


def count(skeleton: Any, adapter: dict[str, Any]) -> int:
    return karst.param_count(skeleton, karst.config_from_dict(adapter))


def all_methods(settings: Settings) -> list[Method]:
    skeleton = create_model_skeleton(BackboneConfig())
    karst_rows = karst_methods(settings)
    return baseline_methods(settings, skeleton, karst_rows) + karst_rows


def trial_config(settings: Settings, method: Method, task: str, seed: int,
                 lr: float) -> TrialConfig:
    return TrialConfig.model_validate({
        "task": {"source": "builtin", "name": task, "train_size": settings.train_size,
                 "val_size": settings.val_size},
        "adapter": method.adapter, "optim": {"lr": lr, "warmup_epochs": 1},
        "epochs": settings.epochs[task], "batch_size": settings.batch_size, "seed": seed})


def choose_lrs(settings: Settings, methods: list[Method], cache: RunCache) -> dict[str, float]:
    """Per family: the lr with the best validation accuracy for its median-size member."""
    skeleton = create_model_skeleton(BackboneConfig())
    task, seed = next(iter(settings.epochs)), settings.seeds[0]
    chosen = {}
    for family in dict.fromkeys(m.family for m in methods):
        members = sorted((m for m in methods if m.family == family),
                         key=lambda m: count(skeleton, m.adapter))
        probe = members[(len(members) - 1) // 2]
        val = {lr: cache.run(trial_config(settings, probe, task, seed, lr),
                             label=f"lr {lr:g} for {family} ({probe.label})").val_accuracy[-1]
               for lr in settings.lrs}
        chosen[family] = max(settings.lrs, key=lambda lr: (val[lr], -settings.lrs.index(lr)))
    return chosen


@dataclass(frozen=True)
class Row:
    """One method on one task: a run per seed."""

    task: str
    method: Method
    lr: float
    records: list[RunRecord]  # in seed order

    @property
    def params(self) -> int:
        return self.records[0].params

    @property
    def test(self) -> list[float]:
        return [r.test_accuracy for r in self.records]

    @property
    def val(self) -> list[float]:
        return [r.val_accuracy[-1] for r in self.records]


def run_study(settings: Settings, cache: RunCache) -> list[Row]:
    methods = all_methods(settings)
    lrs = choose_lrs(settings, methods, cache)
    rows = []
    for task in settings.epochs:
        for method in (m for m in methods if settings.runs_on(m, task)):
            lr = lrs[method.family]
            records = [cache.run(trial_config(settings, method, task, seed, lr),
                                 label=f"{task} seed {seed} {method.label}")
                       for seed in settings.seeds]
            rows.append(Row(task, method, lr, records))
    return rows


@dataclass(frozen=True)
class Effect:
    task: str
    what: str
    diffs: list[float]  # paired by seed

    @property
    def mean(self) -> float:
        return statistics.mean(self.diffs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else 0.0

    def verdict(self) -> str:
        """Helps/hurts when the mean is beyond two standard errors of the paired mean and
        at least `MIN_EFFECT`; otherwise no clear difference."""
        if len(self.diffs) < 2:
            return "one seed: no verdict"
        if (abs(self.mean) <= 2 * self.std / len(self.diffs) ** 0.5
                or abs(self.mean) < MIN_EFFECT):
            return "no clear difference"
        return "helps" if self.mean > 0 else "hurts"


def _karst(rows: list[Row], task: str) -> dict[tuple[int, str], Row]:
    return {(r.method.adapter["num_kernels"], r.method.adapter["rescale"]): r
            for r in rows if r.task == task and r.method.kind == "karst"}


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _mean_over(rows: list[Row]) -> list[float]:
    """Per seed, the mean test accuracy of `rows`."""
    return [statistics.mean(per_seed) for per_seed in zip(*(r.test for r in rows), strict=True)]


def effects(rows: list[Row], settings: Settings) -> list[Effect]:
    """Multi-kernels (N vs 1, same re-scaling), re-scaling (mode vs none, same N), and the
    best KARST row (by validation) against LoRA and LoKr; paired by seed, in points."""
    found = []
    for task in settings.epochs:
        grid = _karst(rows, task)
        kernels, modes = settings.karst_grid(task)
        base_n = kernels[0]
        for n in kernels[1:]:
            found.append(Effect(task, f"N {n} vs N {base_n} (mean over re-scaling modes)",
                                _paired(_mean_over([grid[n, m] for m in modes]),
                                        _mean_over([grid[base_n, m] for m in modes]))))
        if "none" in modes:
            for mode in (m for m in modes if m != "none"):
                found.append(Effect(task, f"re-scaling {mode} vs none (mean over N)",
                                    _paired(_mean_over([grid[n, mode] for n in kernels]),
                                            _mean_over([grid[n, "none"] for n in kernels]))))
        best = max(grid.values(), key=lambda r: statistics.mean(r.val))
        for peer in (r for r in rows if r.task == task and r.method.kind in ("lora", "lokr")):
            found.append(Effect(task, f"{best.method.label} (best KARST by val) vs "
                                      f"{peer.method.label}", _paired(best.test, peer.test)))
    return found


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
