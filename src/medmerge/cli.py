"""The `medmerge` command line: each command is one library call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MedmergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge and verify clinical LLMs in weight space.")
console = Console(stderr=True)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command("merge")
def merge_cmd(
    config: Path = typer.Argument(..., help="mergekit-style YAML (merge_method, models, base_model, parameters, ...)"),
    out: Path = typer.Argument(..., help="output folder (written atomically)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard in BYTES, e.g. 5GB, 500MB, 2GiB"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the kernels (default: torch's)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickle checkpoints (only if you trust them)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let tokenizers run code from the model folders"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="recompute a sample of tensors after merging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge the models of CONFIG into OUT."""
    from .merge import merge

    if device not in ("cpu", "cuda", "auto"):
        _fail(MedmergeError(f"--device must be cpu, cuda or auto, not {device!r}"))
    try:
        result = merge(
            config, out, force=force, shard_size=shard_size, device=device, threads=threads,
            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, verify=verify, progress=not quiet,
        )
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130)
    s = result.stats
    console.print(
        f"merged {s.tensors} tensors with [bold]{result.plan.method.spec.name}[/] into {out} "
        f"({s.bytes_written / 1e6:.1f} MB in {s.seconds:.2f}s)"
    )
    if result.verification is not None:
        worst = max((c.max_abs for c in result.verification.checked), default=0.0)
        console.print(f"verified {len(result.verification.checked)} recomputed tensors: largest abs error {worst:.3g}")
    for note in result.notes:
        console.print(f"note: {note}")


@app.command("verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="a folder written by `medmerge merge`"),
    sample: Optional[float] = typer.Option(None, "--sample", help="recompute only this FRACTION of tensors (0-1)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="inputs are pickle checkpoints you trust"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Recompute FOLDER's tensors from its recorded inputs and config; exit 1 on any mismatch."""
    from .verify import verify

    if sample is not None and not 0 < sample <= 1:
        _fail(MedmergeError("--sample is a fraction in (0, 1]"))
    try:
        report = verify(folder, sample=sample, allow_pickle=allow_pickle, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    table = Table(title=f"{folder}: {len(report.checked)} of {report.total_tensors} tensors recomputed")
    for col in ("tensor", "max abs error", "max rel error", "ok"):
        table.add_column(col)
    for c in sorted(report.checked, key=lambda c: -c.max_abs)[:10]:
        table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", "yes" if c.ok else "[red]NO[/]")
    Console().print(table)
    for p in report.problems:
        console.print(f"[red]problem:[/] {p}")
    for n in report.notes:
        console.print(f"note: {n}")
    Console().print("[bold green]OK[/]" if report.ok else "[bold red]MISMATCH[/]")
    raise typer.Exit(0 if report.ok else 1)


@app.command("methods")
def methods_cmd() -> None:
    """List merge methods, their parameters and defaults."""
    from . import methods

    for name in sorted(methods.REGISTRY):
        spec = methods.REGISTRY[name].spec
        params = ", ".join(
            f"{p.name}{'' if p.required else '=' + str(p.default)} ({p.scope})" for p in spec.params
        )
        Console().print(f"[bold]{name}[/] base={spec.base}: {params}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the demo writes its models"),
    force: bool = typer.Option(True, "--force/--no-force", help="replace an earlier demo run"),
) -> None:
    """Build tiny models, merge them with several methods and verify each merge."""
    from .demo import run_demo

    try:
        run_demo(out, force=force)
    except MedmergeError as e:
        _fail(e)


if __name__ == "__main__":
    app()
