"""`medmerge merge`, `medmerge verify`, `medmerge methods`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..adapters.verify import verify_output
from ..errors import OutputExistsError
from ..merging import is_multi, merge, merge_chain, methods
from .app import app
from .common import command, console, stdout


@command(app, "merge")
def merge_cmd(
    config: Path = typer.Argument(..., help="mergekit-style YAML (merge_method, models, base_model, parameters, ...)"),
    out: Path = typer.Argument(..., help="output folder (written atomically)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard in BYTES, e.g. 5GB, 500MB, 2GiB"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the kernels (default: torch's)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickle checkpoints (only if you trust them)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let tokenizers run code from the model folders"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="recompute a sample of tensors after merging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    intermediate_dir: Optional[Path] = typer.Option(None, "--intermediate-dir", "-I", help="multi-document "
                                                    "CONFIG: folder of the named merges (default: OUT.intermediate)"),
    lazy: bool = typer.Option(True, "--lazy/--no-lazy", help="multi-document CONFIG: reuse unchanged intermediates"),
) -> None:
    """Merge the models of CONFIG into OUT; a multi-document CONFIG (mergekit-multi) runs a chain of merges."""
    kwargs = dict(shard_size=shard_size, device=device, threads=threads, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, verify=verify, progress=not quiet)
    if str(config).endswith((".yml", ".yaml")) and is_multi(config):
        for result in merge_chain(config, out, intermediate=intermediate_dir, lazy=lazy, force=force, **kwargs):
            console.print(result.summary())
        return
    result = merge(config, out, force=force, **kwargs)
    console.print(result.summary())


def check_json_out(path: Path, force: bool) -> None:
    """A report file may be written at `path`: not a folder, and not an existing file unless --force."""
    if path.is_dir():
        raise OutputExistsError(f"--json {path} is a folder; pass the path of a file")
    if path.exists() and not force:
        raise OutputExistsError(f"--json {path} exists; pass --force to replace it, or choose another file")


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON written to a temporary file beside `path`, then renamed over it: never a half-written report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@command(app, "verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="a folder written by `medmerge merge`"),
    sample: Optional[float] = typer.Option(None, "--sample", help="recompute only this FRACTION of tensors (0-1)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    force: bool = typer.Option(False, "--force", help="replace the --json FILE if it exists"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="inputs are pickle checkpoints you trust"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    base: Optional[str] = typer.Option(None, "--base", help="adapter merges: the base model the export should hold"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="adapter merges: PATH:WEIGHT of each "
                                                "adapter the export should hold (repeat); for exports of any tool"),
    method: Optional[str] = typer.Option(None, "--method", help="adapter merges: the intended method (default exact)"),
    density: Optional[float] = typer.Option(None, "--density", help="adapter merges: density of the intended method"),
    seed: Optional[int] = typer.Option(None, "--seed", help="adapter merges: seed of the intended method"),
) -> None:
    """Recompute FOLDER from its inputs; exit 1 on any mismatch.

    A `medmerge merge` output is recomputed from its medmerge.yml. An adapter
    merge (written by `medmerge adapters merge`, or by any tool when --base and
    --adapter say what it should be) is checked module by module against
    W0 + sum w_i dW_i, and an export that equals the base or one adapter alone is
    named as such.
    """
    if json_out:
        check_json_out(json_out, force)  # before the (long) recomputation
    report = verify_output(folder, sample=sample, base=base, adapters=adapter, method=method, density=density,
                           seed=seed, allow_pickle=allow_pickle, progress=not quiet)
    if json_out:
        write_json_atomic(json_out, report.to_dict())
    table = Table(title=f"{folder}: {len(report.checked)} of {report.total_tensors} tensors recomputed")
    for col in ("tensor", "max abs error", "max rel error", "ok"):
        table.add_column(col)
    for c in sorted(report.checked, key=lambda c: -c.max_abs)[:10]:
        table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", "yes" if c.ok else "[red]NO[/]")
    stdout.print(table)
    for p in report.problems + list(getattr(report, "pitfalls", [])):
        console.print(f"[red]problem:[/] {p}")
    for n in report.notes:
        console.print(f"note: {n}")
    stdout.print("[bold green]OK[/]" if report.ok else "[bold red]MISMATCH[/]")
    raise typer.Exit(0 if report.ok else 1)


@command(app, "methods")
def methods_cmd() -> None:
    """List merge methods, their parameters and defaults."""
    rows = methods.describe()
    for name, base, params, memory in rows:
        stdout.print(f"[bold]{name}[/] base={base}: {params}; memory: {memory}", highlight=False)
    stdout.print(f"{len(rows)} methods; their formulas and references: docs/methods.md")
