"""Where one epoch of a built-in fine-tune goes: data, forward, backward, optimiser, validation.

Built-in backbone and `mnist` task from the example configs, batch 32, fp32 on CPU; mean of
3 epochs after building the model. Also the train-epoch time of other methods on the same
task, for comparison.

    .venv/bin/python bench/epoch_time.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.config import load_trial_config  # noqa: E402
from pipeline.train import accuracy  # noqa: E402
from pipeline.trial import prepare_trial  # noqa: E402

EPOCHS = 3
PHASES = ("data", "forward", "backward", "optimiser", "validation")
OTHERS = {"full fine-tuning": {"method": "full"}, "LoRA r 8": {"method": "lora", "rank": 8}}


def phase_times(config_file: str, adapter: dict | None = None) -> dict[str, float]:
    """Mean seconds per epoch spent in each phase."""
    overrides = [] if adapter is None else [f"adapter={adapter}"]
    prepared = prepare_trial(load_trial_config(config_file, overrides))
    model, task = prepared.model, prepared.task
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    total = dict.fromkeys(PHASES, 0.0)
    for epoch in range(EPOCHS):
        model.train()
        mark = time.perf_counter()
        batches = task.train.batches(32, shuffle=True,
                                     generator=torch.Generator().manual_seed(epoch))
        for images, labels in batches:
            marks = [mark, time.perf_counter()]
            loss = F.cross_entropy(model(images), labels)
            marks.append(time.perf_counter())
            optimizer.zero_grad()
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            marks.append(time.perf_counter())
            for phase, (a, b) in zip(PHASES, zip(marks, marks[1:], strict=False), strict=False):
                total[phase] += b - a
            mark = marks[-1]
        start = time.perf_counter()
        accuracy(model, task.val)
        total["validation"] += time.perf_counter() - start
    return {phase: seconds / EPOCHS for phase, seconds in total.items()}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"mean of {EPOCHS} epochs\n")
    print("| config | " + " | ".join(PHASES) + " | epoch |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for config_file in ("examples/train_karst.yaml", "examples/train_linear.yaml"):
        times = phase_times(config_file)
        cells = " | ".join(f"{times[p]:.2f} s" for p in PHASES)
        print(f"| `{config_file}` | {cells} | **{sum(times.values()):.2f} s** |")
    print()
    for label, adapter in OTHERS.items():
        times = phase_times("examples/train_karst.yaml", adapter)
        train = sum(times[p] for p in PHASES[:4])
        print(f"- {label}: train epoch {train:.2f} s")


if __name__ == "__main__":
    main()
