"""`karst train` and `karst pretrain`: one fine-tune, the built-in backbone."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli.app import app, console, fail


def _epoch_progress(total: int) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)


@app.command()
def train(
    config_file: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Trial config."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="Override one field, e.g. --set optim.lr=3e-3."),
    experiment: str | None = typer.Option(None, help="MLflow experiment (default: MLflow's)."),
    checkpoint_dir: Path | None = typer.Option(
        None, help="Checkpoint every epoch here; the same command resumes from it."),
) -> None:
    """Fine-tune once as CONFIG.yaml says and log it as one MLflow run."""
    from pipeline.config import ConfigError, load_trial_config
    from pipeline.trial import default_device, prepare_trial

    try:
        config = load_trial_config(config_file, overrides)
        prepared = prepare_trial(config, default_device())  # every check, before MLflow
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    _train_and_log(config, prepared, config_file, experiment, checkpoint_dir)


def _train_and_log(config, prepared, config_file: Path, experiment: str | None,  # noqa: ANN001
                   checkpoint_dir: Path | None) -> None:
    import mlflow

    from pipeline import tracking
    from pipeline.trial import run_trial

    with tracking.trial_run(config, run_name=config_file.stem, source=str(config_file),
                            experiment=experiment, checkpoint_dir=checkpoint_dir) as run, \
            _epoch_progress(config.epochs) as bar:
        task = bar.add_task(f"{config.adapter.method} on {config.task.name}",
                            total=config.epochs, status="")

        def on_epoch(report):  # noqa: ANN001, ANN202
            tracking.log_epoch(report)
            bar.update(task, completed=report.epoch,
                       status=f"loss {report.train_loss:.3f}  val {report.val_accuracy:.1%}")

        result = run_trial(config, prepared=prepared, on_epoch=on_epoch,
                           checkpoint_dir=checkpoint_dir)
        tracking.log_result(result)
    best = max(result.reports, key=lambda r: r.val_accuracy)
    seconds = sum(r.epoch_seconds for r in result.reports)
    console.print(
        f"[bold]{config.adapter.method}[/] on {config.task.name} with {config.backbone.name}: "
        f"test accuracy [bold]{result.test_accuracy:.1%}[/], final val "
        f"{result.reports[-1].val_accuracy:.1%} (best {best.val_accuracy:.1%} at epoch "
        f"{best.epoch}), {result.params:,} adapter params, {seconds:.1f} s over "
        f"{len(result.reports)} epochs.\n"
        f"MLflow run {run.info.run_id} in {mlflow.get_tracking_uri()}")


@app.command()
def pretrain(
    epochs: int = typer.Option(4, min=1, help="Training epochs over the 60 000 train images."),
    out: Path | None = typer.Option(
        None, help="Where the weights (safetensors + metadata) go; default: the package's "
                   "pipeline/weights/karst_vit_fmnist.safetensors, which the backbone loads."),
    data_dir: Path | None = typer.Option(
        None, help="Folder with the Fashion-MNIST IDX files (default: Debian's "
                   "dataset-fashion-mnist, else torchvision's download)."),
    device: str = typer.Option("cpu", help="cpu (reproduces the shipped weights) or cuda."),
) -> None:
    """Pretrain the built-in backbone karst_vit_fmnist on Fashion-MNIST and save its weights."""
    from pipeline.backbones import BUILTIN_ARCH, BUILTIN_WEIGHTS
    from pipeline.pretrain import PRETRAIN_RECIPE, pretrain_builtin

    console.print(f"[bold]Backbone[/] karst_vit_fmnist {BUILTIN_ARCH}, from scratch")
    console.print(f"[bold]Recipe[/] {dict(PRETRAIN_RECIPE, epochs=epochs)} (AdamW, cosine "
                  "with linear warm-up); Fashion-MNIST 60 000 train / 10 000 test")
    table = Table("epoch", "train loss", "test acc", "seconds")
    with Progress(TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("fit", total=epochs)

        def on_epoch(report):  # noqa: ANN001, ANN202
            table.add_row(str(report.epoch), f"{report.train_loss:.3f}",
                          f"{report.val_accuracy:.1%}", f"{report.epoch_seconds:.0f}")
            progress.advance(bar)

        try:
            result = pretrain_builtin(epochs=epochs, out=out or BUILTIN_WEIGHTS, data_dir=data_dir,
                                      device=device, on_epoch=on_epoch)
        except ValueError as err:
            raise fail(str(err)) from None
    console.print(table)
    console.print(f"[bold]Test accuracy[/] {result.test_accuracy:.2%} on 10 000 test images, "
                  f"{result.seconds / 60:.1f} min of training")
    console.print(f"[bold]Weights saved[/] {result.path} "
                  f"({result.path.stat().st_size / 1e6:.2f} MB)")
