"""`medmerge train`, `medmerge stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..runtime import process_rank
from ..training.config import load_config
from ..training.stats import collect_stats
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


@command(app, "stats")
def stats_cmd(
    model: Path = typer.Argument(..., help="model folder (safetensors + config + tokenizer)"),
    data: list[str] = typer.Option(..., "--data", help="calibration records: JSONL/CSV/TSV/JSON with `text`, or "
                                   "`prompt` + `response`, or `messages`; or a .txt file of one document per line. "
                                   "Repeat it to mix files; FILE:N takes a seeded sample of N records"),
    out: Path = typer.Option(..., "--out", help="statistics folder to write (atomically)"),
    kinds: str = typer.Option("gram,fisher", "--kinds", help="gram (RegMean), fisher (Fisher merging), or both"),
    max_length: int = typer.Option(512, "--max-length", help="tokens per example (longer ones are cut)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use a seeded sample of N of all records"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per forward pass (gram only; fisher takes "
                                   "one example at a time)"),
    seed: int = typer.Option(0, "--seed", help="seed of the FILE:N and --limit samples"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("float32", "--dtype", help="model dtype for the pass (statistics are float32)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Calibration statistics of MODEL for data-aware merges (regmean, fisher), one pass over the data."""
    record = collect_stats(model, data, out, kinds=[k.strip() for k in kinds.split(",") if k.strip()],
                           max_length=max_length, limit=limit, batch_size=batch_size, seed=seed, device=device,
                           dtype=dtype, force=force, progress_bar=not quiet)
    console.print(f"wrote {', '.join(record['kinds'])} statistics of {record['examples']} examples "
                  f"({record['tokens']} tokens) to {out}")
