"""The `karst` command line."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Tune, merge and ship KARST adapters for timm vision backbones.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def main() -> None:
    """karst-search: multi-kernel Kronecker adapters, searched and shipped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@app.command()
def demo(
    epochs: int = typer.Option(12, min=1, help="Fine-tuning epochs."),
    out: Path = typer.Option(Path("demo-output"), help="Where the adapter file is written."),
) -> None:
    """Fine-tune KARST once on scikit-learn's digits, merge it, check the merge, save it."""
    import timm
    import torch

    from karst import KarstConfig, apply_karst, merge_karst, param_count, save_adapter
    from karst import trainable_parameters as count_trainable
    from pipeline.data import digits_task
    from pipeline.train import Schedule, accuracy, fit

    task = digits_task(img_size=8)
    config = KarstConfig(num_kernels=4, factor=4, rank=4, alpha=8.0, init="kaiming")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8,
                              patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3,
                              num_classes=task.num_classes, global_pool="avg")
    console.print("[bold]Backbone[/] a 2-block ViT (dim 48, 8×8 inputs), randomly initialised and "
                  "frozen: no pretrained weights ship yet")
    console.print(f"[bold]Task[/] {task.name}: {len(task.train)} train / {len(task.val)} val / "
                  f"{len(task.test)} test images, {task.num_classes} classes")
    console.print(f"[bold]Adapter[/] {config}")
    predicted = param_count(model, config)
    apply_karst(model, config)
    counts = count_trainable(model)
    console.print(f"[bold]Trainable[/] {counts['adapter']:,} adapter params (closed form "
                  f"{predicted:,}) + {counts['head']:,} head, of "
                  f"{sum(p.numel() for p in model.parameters()):,} in the model")
    table = Table("epoch", "train loss", "val acc", "seconds")
    with Progress(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("fit", total=epochs)

        def on_epoch(report):  # noqa: ANN001, ANN202
            table.add_row(str(report.epoch), f"{report.train_loss:.3f}",
                          f"{report.val_accuracy:.1%}", f"{report.epoch_seconds:.2f}")
            progress.advance(bar)

        fit(model, task.train, task.val, Schedule(epochs=epochs, lr=1e-2), on_epoch=on_epoch)
    console.print(table)
    adapted_test = accuracy(model, task.test)
    path = save_adapter(model, out / "digits-karst.safetensors")
    probe = task.test.images[:64]
    with torch.no_grad():
        before = model(probe)
        merge_karst(model)
        gap = (model(probe) - before).abs().max().item()
    console.print(f"[bold]Test accuracy[/] {adapted_test:.1%} adapted, "
                  f"{accuracy(model, task.test):.1%} merged (max |Δlogit| {gap:.1e})")
    console.print(f"[bold]Adapter saved[/] {path}")
