"""Where the dense KARST forward beats the factored one: the measurement behind the `auto` rule.

For ViT-B/16 layer shapes and several (N, f, r), time a single `AdaptedLinear` in each
form at growing token counts, training step (forward + backward) and inference, and print
the ratio next to what the `auto` rule in `karst.layer` picks.

    .venv/bin/python bench/forward_rule.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn

from karst.layer import AdaptedLinear, KroneckerDelta, NoRescale, Rescale

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
CONFIGS = [(8, 8, 8), (2, 8, 4), (4, 16, 2), (1, 4, 16)]  # (N, f, r)
TOKENS = [16, 64, 256, 1024, 1576, 4096]


def make_layer(d_out: int, d_in: int, config: tuple[int, int, int], mode: str,
               rescale_mode: str) -> AdaptedLinear:
    n, f, r = config
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    delta = KroneckerDelta(d_out, d_in, num_kernels=n, factor=(f, f), rank=r, scale=1.0)
    rescale = (NoRescale() if rescale_mode == "none"
               else Rescale(d_out, mode=rescale_mode, has_bias=True))
    return AdaptedLinear(base, delta, rescale, forward_mode=mode)


def step_seconds(layer: AdaptedLinear, x: Tensor, train: bool) -> float:
    start = time.perf_counter()
    if train:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)
    return time.perf_counter() - start


def dense_over_factored(d_out: int, d_in: int, config: tuple[int, int, int], tokens: int,
                        train: bool, args: argparse.Namespace) -> float:
    """Median time ratio dense / factored, the two forms interleaved so drift hits both."""
    layers = [make_layer(d_out, d_in, config, m, args.rescale) for m in ("dense", "factored")]
    x = torch.randn(tokens, d_in, requires_grad=train)
    times: list[list[float]] = [[], []]
    for i in range(args.repeats + 1):
        for form, layer in enumerate(layers):
            seconds = step_seconds(layer, x, train)
            if i:
                times[form].append(seconds)
    return statistics.median(times[0]) / statistics.median(times[1])


def rule_picks_dense(d_out: int, d_in: int, config: tuple[int, int, int], tokens: int,
                     train: bool) -> bool:
    delta = make_layer(d_out, d_in, config, "auto", "none").delta
    with torch.set_grad_enabled(train):
        return delta._dense_pays(torch.empty(tokens, d_in))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rescale", choices=("channel", "scalar", "none"), default="channel",
                        help="re-scaling of the timed layers (KARST's default: channel)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"rescale={args.rescale}")
    print("Time of the dense form / time of the factored form (< 1: dense is faster); "
          "* marks where the auto rule picks dense.\n")
    for train in (True, False):
        print(f"### {'training step (forward + backward)' if train else 'inference'}\n")
        print("| layer | N, f, r | " + " | ".join(f"T={t}" for t in TOKENS) + " |")
        print("|---|---|" + "---|" * len(TOKENS))
        for name, (d_out, d_in) in SHAPES.items():
            for config in CONFIGS:
                cells = [f"{dense_over_factored(d_out, d_in, config, t, train, args):.2f}"
                         + ("*" if rule_picks_dense(d_out, d_in, config, t, train) else "")
                         for t in TOKENS]
                print(f"| {name} {d_out}×{d_in} | {config} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
