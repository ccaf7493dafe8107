"""`medmerge medcare stage1 | stage2 | export`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from ..medcare.config import load_stage_config
from ..medcare.export import export
from ..medcare.train import run_stage1, run_stage2
from .app import medcare_app
from .common import command, console
from .train import RESUMABLE

def _stage_command(kind: str, config_help: str, doc: str, run: Callable) -> None:
    """`medmerge medcare stage1` / `stage2`: the same options, their own config and recipe."""
    def stage_cmd(
        config: Path = typer.Argument(..., help=config_help),
        overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. "
                                                        "training.max_steps=200 alignment.lambda=1.0"),
        out: Path = typer.Option(..., "--out", help="run folder (MedCare tensors, config, logs; written atomically)"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
        resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in OUT.medmerge-work/"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        cfg = load_stage_config(kind, config, overrides or [])
        result = run(cfg, out, force=force, resume=resume, progress=not quiet)
        console.print(f"MedCare {kind}: {result.summary()}")

    stage_cmd.__doc__ = doc
    command(medcare_app, kind, interrupted=RESUMABLE)(stage_cmd)


_stage_command("stage1", "stage-1 YAML: model, data (knowledge + alignment), modules, training",
               "Stage 1: attention LoRA + FFN knowledge aggregator with routed noise experts.", run_stage1)
_stage_command("stage2", "stage-2 YAML: stage1 (run folder), data (alignment), alignment",
               "Stage 2: attention merged and frozen, noise dropped, alignment module orthogonal to the knowledge one.",
               run_stage2)


@command(medcare_app, "export")
def medcare_export_cmd(
    run: Path = typer.Argument(..., help="a stage-2 run folder (or stage 1 with --drop-noise)"),
    out: Path = typer.Option(..., "--out", help="output model folder (sharded safetensors, written atomically)"),
    base: Optional[Path] = typer.Option(None, "--base", help="the base model, if it moved since training"),
    drop_noise: bool = typer.Option(False, "--drop-noise", help="stage 1: export the knowledge path only"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the base's)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest shard, in bytes with a unit (5GB, 500MB)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the logits check (tensors are still read back)"),
    device: str = typer.Option("cpu", "--device", help="where the logits check runs (cpu, cuda)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Fold a MedCare run into a plain checkpoint that transformers loads, verified on logits."""
    record = export(run, out, base=base, drop_noise=drop_noise, dtype=dtype, shard_size=shard_size,
                    verify=not no_verify, device=device, force=force, progress=not quiet)
    v = record.get("verified")
    if v:
        console.print(f"verified: max |logit diff| {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g} "
                      f"({v['tolerance_rule']}); argmax agreement {v['argmax_agreement']:.4f}")
    console.print(f"exported {record['medmerge']['modules_folded']} folded projections -> {out}")
