"""The runs behind `bench.peers`: methods at matched sizes, the learning rates, the effects.

`run_study` fine-tunes every method on every task and seed (each run cached by its config),
after choosing one learning rate per method family; `effects` turns the runs into paired,
per-seed differences (multi-kernels, re-scaling, KARST against LoRA and LoKr).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import karst
from bench.runs import RunCache, RunRecord
from pipeline.backbones import create_model_skeleton
from pipeline.config import BackboneConfig, TrialConfig

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
