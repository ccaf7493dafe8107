"""`medmerge miniclinic build`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..miniclinic.build import build, render_table
from .app import miniclinic_app
from .common import command, console


@command(miniclinic_app, "build")
def miniclinic_build_cmd(
    out: Path = typer.Argument(..., help="output folder: data/, models/<name>/, eval/, summary.json"),
    preset: str = typer.Option("quick", "--preset", help="quick (<= 3 min on 2 cores) or full (<= 12 min)"),
    seed: int = typer.Option(0, "--seed", help="seed for the world's data, model init and training"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    no_cache: bool = typer.Option(False, "--no-cache", help="rebuild even if a cached build exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Generate the synthetic world and train base, instruct, clinical and instruct_ft on it."""
    summary = build(out, preset=preset, seed=seed, force=force, progress=not quiet, use_cache=not no_cache)
    typer.echo(render_table(summary))
    where = f" (from cache {summary['from_cache']})" if summary.get("from_cache") else ""
    console.print(f"built {out} with preset {preset}, seed {seed} in {summary['timings_s']['total']:.0f}s{where}")
