"""Training-step cost of KARST adapters next to LoRA, LoKr and the frozen / full baselines.

What it measures, on one timm model (default ViT-B/16, random init: weights do not change
speed), all rows side by side:

* trainable parameters, classifier head excluded;
* training-step time: forward + cross-entropy backward + AdamW step over the trainable
  parameters, median of `--steps` after `--warmup` steps;
* peak extra memory of those steps: on CPU the peak RSS (`ru_maxrss`, peak reset right after
  the model is built and adapted) minus the RSS at that moment; on CUDA
  `torch.cuda.max_memory_allocated` minus the memory allocated at that moment.

Rows: frozen backbone + head (linear probe), KARST N=8 f=8 r=8 and N=2 f=8 r=4 (channel
re-scaling), HF peft LoKr (one kernel, f=8, r=8), HF peft LoRA at the ranks whose parameter
counts are closest to each KARST row's, full fine-tuning, and KARST N=8 forced to
`forward="factored"` and `forward="dense"` to judge the `"auto"` rule. A last line times
eval inference of a merged KARST model against the plain model (the ratio should be 1.00).

Every row runs in a fresh subprocess (this script re-invoked with `--row NAME`), so rows
neither share memory peaks nor disturb each other's caches. CPU runs in float32 with
`torch.set_num_threads(os.cpu_count())`; with CUDA available, bf16 autocast on the GPU.

Run (from the repository root):

    .venv/bin/python bench/adapter_step.py
    .venv/bin/python bench/adapter_step.py --model vit_tiny_patch16_224 --img-size 64 \\
        --steps 2 --warmup 0                      # quick smoke run
    .venv/bin/python bench/adapter_step.py --markdown bench/adapter_step.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import karst  # noqa: E402

RESULT_TAG = "ADAPTER_STEP_RESULT "
PEFT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
KARST_N8 = karst.KarstConfig(num_kernels=8, factor=8, rank=8, rescale="channel")
KARST_N2 = karst.KarstConfig(num_kernels=2, factor=8, rank=4, rescale="channel")


@dataclass(frozen=True)
class Row:
    """One benchmarked method: how to adapt a fresh model, and which LoRA row it is judged by."""

    name: str
    label: str
    adapt: Callable[[nn.Module], tuple[nn.Module, str | None]]  # model, label override
    lora_ref: str | None = None


# ----------------------------------------------------------------------------- adapters


def _karst(config: karst.AdapterConfig) -> Callable[[nn.Module], tuple[nn.Module, None]]:
    return lambda model: (karst.apply_karst(model, config), None)


def _equal_lora_rank(model: nn.Module, reference: karst.AdapterConfig) -> int:
    """The LoRA rank whose parameter count (head excluded) is closest to `reference`'s."""
    target = karst.param_count(model, reference)
    per_rank = karst.param_count(model, karst.LoraConfig(rank=1))
    guess = max(1, round(target / per_rank))
    candidates = [r for r in (guess - 1, guess, guess + 1) if r >= 1]
    return min(candidates, key=lambda r: abs(r * per_rank - target))


def _peft_lora(reference: karst.AdapterConfig) -> Callable[[nn.Module], tuple[nn.Module, str]]:
    def adapt(model: nn.Module) -> tuple[nn.Module, str]:
        import peft

        rank = _equal_lora_rank(model, reference)
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS,
                                 modules_to_save=["head"])
        return peft.get_peft_model(model, config), f"peft LoRA r={rank}"
    return adapt


def _peft_lokr(model: nn.Module) -> tuple[nn.Module, str]:
    import peft

    config = peft.LoKrConfig(r=8, alpha=8, decompose_factor=8, target_modules=PEFT_TARGETS,
                             modules_to_save=["head"])
    return peft.get_peft_model(model, config), "peft LoKr f=8 r=8 (KARST N=1 equiv.)"


def _forced(mode: str) -> karst.KarstConfig:
    return karst.KarstConfig(num_kernels=8, factor=8, rank=8, rescale="channel", forward=mode)


ROWS = [
    Row("frozen", "frozen backbone + head", _karst(karst.LinearProbeConfig())),
    Row("karst_n8", "KARST N=8 f=8 r=8", _karst(KARST_N8), lora_ref="lora_eq_n8"),
    Row("karst_n2", "KARST N=2 f=8 r=4", _karst(KARST_N2), lora_ref="lora_eq_n2"),
    Row("lokr", "peft LoKr", _peft_lokr),
    Row("lora_eq_n8", "peft LoRA (= KARST N=8 params)", _peft_lora(KARST_N8)),
    Row("lora_eq_n2", "peft LoRA (= KARST N=2 params)", _peft_lora(KARST_N2)),
    Row("full", "full fine-tuning", _karst(karst.FullFinetuneConfig())),
    Row("karst_n8_factored", "KARST N=8 f=8 r=8, forward=factored",
        _karst(_forced("factored")), lora_ref="lora_eq_n8"),
    Row("karst_n8_dense", "KARST N=8 f=8 r=8, forward=dense",
        _karst(_forced("dense")), lora_ref="lora_eq_n8"),
]
ROW_BY_NAME = {row.name: row for row in ROWS}
MERGED = "merged"


# ----------------------------------------------------------------------------- measuring


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": args.num_classes}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    return timm.create_model(args.model, **kwargs).to(device)


def input_batch(model: nn.Module, args: argparse.Namespace,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = args.img_size or model.pretrained_cfg["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=generator)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=generator)
    return x.to(device), y.to(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trainable_excluding_head(model: nn.Module) -> int:
    """Works for karst and peft models alike (peft's head wrapper is still `get_classifier`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_ids = {id(p) for head in karst.classifier_heads(base) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_ids)


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Extra peak memory from `start()` on: CUDA allocator peak, or peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0.0
        self.note = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
            return
        try:  # Linux: writing 5 resets the peak RSS (VmHWM, ru_maxrss) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = _current_rss_mb()
        except OSError:  # peak then includes whatever building the model cost
            self.baseline = _current_rss_mb()
            self.note = "peak not reset"

    def extra_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.baseline
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(0.0, peak - self.baseline)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of `fn()` in milliseconds, synchronising CUDA on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  device: torch.device) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


def run_row(row: Row, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Child process body for one training row."""
    model = build_model(args, device)
    model, label = row.adapt(model)
    model.train()
    x, y = input_batch(model, args, device)
    step = train_step_fn(model, x, y, device)
    memory = PeakMemory(device)
    memory.start()
    for _ in range(args.warmup):
        step()
    times = [timed(step, device) for _ in range(args.steps)]
    return {"name": row.name, "label": label or row.label,
            "params": trainable_excluding_head(model),
            "step_ms": statistics.median(times), "peak_mb": memory.extra_mb(),
            "memory_note": memory.note}


# ----------------------------------------------------------------------------- merged inference


@torch.no_grad()
def randomise_adapters(model: nn.Module) -> None:
    """Non-zero ΔW and re-scaling, so the merge actually changes the weights."""
    for module in model.modules():
        if isinstance(module, karst.AdaptedLinear):
            for p in [*module.delta.parameters(), *module.rescale.parameters()]:
                p.normal_(std=0.02)


def merged_model(args: argparse.Namespace, device: torch.device,
                 x: torch.Tensor) -> tuple[nn.Module, float]:
    """KARST N=8 f=8 r=8, randomised and merged; also the max |merged - adapted| output."""
    model = karst.apply_karst(build_model(args, device), KARST_N8).eval()
    randomise_adapters(model)
    with torch.inference_mode(), autocast(device):
        before = model(x).float()
    karst.merge_karst(model)
    with torch.inference_mode(), autocast(device):
        after = model(x).float()
    return model, (after - before).abs().max().item()


def run_merged(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Child process body: eval forward of the merged model against the plain model."""
    plain = build_model(args, device).eval()
    x, _ = input_batch(plain, args, device)
    merged, max_diff = merged_model(args, device, x)

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device):
                model(x)
        return run
    for _ in range(args.warmup):
        forward(plain)()
        forward(merged)()
    plain_ms, merged_ms = [], []
    for _ in range(args.steps):  # interleaved, so drifting load hits both alike
        plain_ms.append(timed(forward(plain), device))
        merged_ms.append(timed(forward(merged), device))
    return {"name": MERGED, "plain_ms": statistics.median(plain_ms),
            "merged_ms": statistics.median(merged_ms), "max_abs_diff": max_diff}


def child_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = pick_device(args.device)
    if args.row == MERGED:
        result = run_merged(args, device)
    else:
        result = run_row(ROW_BY_NAME[args.row], args, device)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def child_command(args: argparse.Namespace, row: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", args.model,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--num-classes", str(args.num_classes), "--device", args.device]
    if args.img_size is not None:
        cmd += ["--img-size", str(args.img_size)]
    return cmd


def run_child(args: argparse.Namespace, row: str) -> dict[str, Any]:
    """Runs one row in a fresh interpreter; a failure becomes a row with an `error`."""
    proc = subprocess.run(child_command(args, row), capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"  row {row!r} failed (exit {proc.returncode}): {tail}", file=sys.stderr)
    label = ROW_BY_NAME[row].label if row in ROW_BY_NAME else "merged inference"
    return {"name": row, "label": label, "error": tail}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def table_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    frozen = results.get("frozen", {}).get("step_ms")
    lines = ["| method | trainable params | step ms | step × frozen | "
             "step × LoRA (equal params) | peak extra MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        r = results.get(row.name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:60]} | | | | |")
            continue
        lora = results.get(row.lora_ref, {}).get("step_ms") if row.lora_ref else None
        lines.append(f"| {r['label']} | {r['params']:,} | {r['step_ms']:.1f} | "
                     f"{ratio(r['step_ms'], frozen)} | {ratio(r['step_ms'], lora)} | "
                     f"{r['peak_mb']:.0f}{' (peak not reset)' if r.get('memory_note') else ''} |")
    return lines


def merged_line(merged: dict[str, Any] | None) -> list[str]:
    if merged is None:
        return []
    if "error" in merged:
        return [f"Merged inference: failed: {merged['error']}"]
    return [f"Merged inference (KARST N=8 f=8 r=8, randomised, merge_karst) vs plain model, "
            f"eval forward: {merged['merged_ms']:.1f} ms vs {merged['plain_ms']:.1f} ms = "
            f"×{merged['merged_ms'] / merged['plain_ms']:.2f} "
            f"(max |merged − unmerged| output = {merged['max_abs_diff']:.2e})"]


def _pair(results: dict[str, dict[str, Any]], a: str, b: str) -> str | None:
    ra, rb = results.get(a, {}), results.get(b, {})
    if "step_ms" not in ra or "step_ms" not in rb:
        return None
    return (f"- {ra['label']} / {rb['label']}: step ×{ratio(ra['step_ms'], rb['step_ms'])}, "
            f"peak extra memory ×{ratio(ra['peak_mb'], rb['peak_mb'])}, "
            f"params ×{ratio(ra['params'], rb['params'])}")


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    pairs = [("karst_n8", "lora_eq_n8"), ("karst_n2", "lora_eq_n2"),
             ("karst_n8", "lokr"), ("karst_n2", "lokr")]
    lines = [line for a, b in pairs if (line := _pair(results, a, b))]
    modes = {m: results.get(n, {}).get("step_ms") for m, n in
             [("auto", "karst_n8"), ("factored", "karst_n8_factored"),
              ("dense", "karst_n8_dense")]}
    if all(modes.values()):
        best = min(("factored", "dense"), key=lambda m: modes[m])
        lines.append(f"- forward rule (KARST N=8): auto {modes['auto']:.1f} ms, factored "
                     f"{modes['factored']:.1f} ms, dense {modes['dense']:.1f} ms; auto is "
                     f"×{modes['auto'] / modes[best]:.2f} the best forced mode ({best})")
    return ["", "Summary:", *lines] if lines else []


def header_lines(args: argparse.Namespace) -> list[str]:
    device = pick_device(args.device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak RSS (ru_maxrss) over the RSS after building")
    return [f"torch {torch.__version__}, timm {timm.__version__}; device {name} ({precision}), "
            f"threads {os.cpu_count()}, batch {args.batch}, model {args.model}"
            + (f" @ {args.img_size}px" if args.img_size else "")
            + f", steps {args.steps} (median) after {args.warmup} warm-up, fastest of "
            f"{args.rounds} round-robin rounds",
            f"Trainable params exclude the classifier head; peak extra memory = {memory}; "
            "each row in its own subprocess.", ""]


def run_rounds(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every row once per round, rounds back to back; each row keeps its fastest round.

    On a shared 2-core VM the load drifts by 10 % or more over the minutes a pass takes;
    round-robin spreads that drift over all rows, and the fastest round of each is the one
    least disturbed (peak memory comes from that same round).
    """
    best: dict[str, dict[str, Any]] = {}
    for round_index in range(1, args.rounds + 1):
        for name in names:
            print(f"round {round_index}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            result = run_child(args, name)
            key = "merged_ms" if name == MERGED else "step_ms"
            previous = best.get(name, {}).get(key, float("inf"))
            if name not in best or result.get(key, float("inf")) < previous:
                best[name] = result
    return best


def parent_main(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.rows.split(",")] if args.rows else \
        [row.name for row in ROWS] + [MERGED]
    unknown = [n for n in names if n not in ROW_BY_NAME and n != MERGED]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {[*ROW_BY_NAME, MERGED]}")
    results = run_rounds(args, names)
    merged = results.pop(MERGED, None)
    lines = [*header_lines(args), *table_lines(results), "", *merged_line(merged),
             *summary_lines(results)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated subset of {[*ROW_BY_NAME, MERGED]}")
    parser.add_argument("--rounds", type=int, default=3,
                        help="round-robin passes over the rows; each keeps its fastest")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="also write the table to PATH")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.row is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
