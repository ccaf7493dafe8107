"""`medmerge analyze decoding | leakage | loss | deltas`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import InputError
from ..experiments.analysis import (
    DEFAULT_SETTINGS, check_deltas_json, check_leakage_json, decoding_grid, decoding_table, loss_plot,
    reasoning_leakage, write_deltas_json, write_leakage_json,
)
from ..merging.deltas import render_markdown as render_task_vectors
from ..merging.deltas import task_vectors
from .app import analyze_app
from .common import command, console, labelled, stdout


def _labelled(runs: list[str]) -> dict[str, str]:
    """`labelled`, refusing two runs with one label (the second would silently replace the first)."""
    labels = [r.split("=", 1)[0] if "=" in r else Path(r).name for r in runs]
    for label in dict.fromkeys(labels):
        same = [r for r, lab in zip(runs, labels) if lab == label]
        if len(same) > 1:
            raise InputError(f"{', '.join(same)} all get the label {label!r}; give each run its own, as LABEL=PATH")
    return labelled(runs)


@command(analyze_app, "decoding")
def analyze_decoding_cmd(
    model: Path = typer.Argument(..., help="a local model folder"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated task names"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    setting: Optional[list[str]] = typer.Option(None, "--setting", help="greedy, or t=0.6,p=0.8 / rp=1.2 (repeat); "
                                                "default: greedy, t=0.6,p=0.8, t=0.7,p=0.9, rp=1.2"),
    include_path: Optional[list[Path]] = typer.Option(None, "--include-path", help="extra task folder (repeat)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data folder of the tasks"),
    limit: Optional[float] = typer.Option(None, "--limit", help="samples per task"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    seed: int = typer.Option(1234, "--seed", help="seed of the sampled settings (recorded)"),
    pattern: str = typer.Option(r"<think>.*?</think>", "--reasoning-pattern", help="regex of a reasoning span"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Evaluate MODEL under a grid of decoding settings: a table and a plot per metric, and reasoning leakage."""
    report = decoding_grid(model, setting or DEFAULT_SETTINGS, [t.strip() for t in tasks.split(",") if t.strip()],
                           out, max_new_tokens=max_new_tokens, reasoning_pattern=pattern, force=force,
                           include_paths=include_path or [], data_dir=data_dir, limit=limit,
                           batch_size=batch_size, device=device, seed=seed)
    stdout.print(decoding_table(report))
    console.print(f"wrote {out / 'decoding.json'}, decoding.md, decoding.png")


@command(analyze_app, "leakage")
def analyze_leakage_cmd(
    runs: list[str] = typer.Argument(..., help="eval folders written with --log-samples, as DIR or LABEL=DIR"),
    pattern: str = typer.Option(r"<think>.*?</think>", "--reasoning-pattern", help="regex of a reasoning span"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the counts here (a .json file)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier leakage report at --json"),
) -> None:
    """Share of generated outputs that contain a reasoning span, per run and task."""
    if json_out:
        check_leakage_json(json_out, force)  # before counting: a bad path fails at once
    report = reasoning_leakage(_labelled(runs), pattern)
    table = Table(title=f"reasoning leakage ({pattern})")
    for col in ("run", "outputs", "with a reasoning span", "rate"):
        table.add_column(col)
    for label, r in report.items():
        table.add_row(label, str(r["outputs"]), str(r["matches"]), f"{r['rate']:.3f}")
    stdout.print(table)
    if json_out:
        write_leakage_json(report, json_out, force=force)


@command(analyze_app, "loss")
def analyze_loss_cmd(
    runs: list[str] = typer.Argument(..., help="training output folders or train_log.jsonl files, as PATH or "
                                     "LABEL=PATH"),
    out: Path = typer.Option(..., "--out", help="plot to write: a .png (or .pdf, .svg) file in an existing folder"),
    title: str = typer.Option("training loss", "--title"),
    force: bool = typer.Option(False, "--force", help="replace an earlier plot at --out"),
) -> None:
    """One plot with the training (and eval) loss of several `medmerge train` runs."""
    loss_plot(_labelled(runs), out, title, force=force)
    console.print(f"wrote {out}")


@command(analyze_app, "deltas")
def analyze_deltas_cmd(
    base: Path = typer.Argument(..., help="the common parent model folder"),
    models: list[str] = typer.Argument(..., help="fine-tuned model folders, as DIR or LABEL=DIR"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report here (a .json file)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier task-vector report at --json"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="no progress bar"),
) -> None:
    """Are these models mergeable? Each one's task vector from BASE: relative delta norm (non-embedding and
    embedding apart; a real LLM fine-tune moves about 1%) and the cosines between the models' deltas."""
    if json_out:
        check_deltas_json(json_out, force)  # before reading any tensor: a bad path fails at once
    report = task_vectors(base, _labelled(models), progress=not quiet)
    stdout.print(render_task_vectors(report))
    if json_out:
        write_deltas_json(report, json_out, force=force)
        console.print(f"wrote {json_out}")
