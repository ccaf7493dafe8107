"""`medmerge train`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..runtime import process_rank
from ..training.config import load_config
from ..training.trainer import train
from .app import app
from .common import command, console

RESUMABLE = "nothing was written; checkpoints are kept for --resume"


@command(app, "train", interrupted=RESUMABLE, context_settings={"allow_extra_args": False})
def train_cmd(
    config: Path = typer.Argument(..., help="training YAML (stage, model, data, lora, training, ...)"),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. training.lr=1e-3 lora.r=8 k_shot=64"),
    out: Path = typer.Option(..., "--out", help="output folder for the model or adapter (written atomically)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in OUT.medmerge-work/"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train one stage: pt (continued pre-training) or sft (instruction tuning), full or LoRA."""
    result = train(load_config(config, overrides or []), out, force=force, resume=resume, progress=not quiet)
    if process_rank() == 0:  # under `accelerate launch`/torchrun rank 0 wrote OUT
        console.print(f"trained {result.summary()}")
