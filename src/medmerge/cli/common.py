"""What every command shares: the consoles, and the one place errors become exit codes.

A command parses its options, calls one library function and prints what it returns. Errors
that reach the user are `MedmergeError`s (each names what is wrong, where, and what to do):
`command` prints them and exits with status 2; Ctrl-C exits with 130 and says what was kept. An OS
error becomes one naming the path and the remedy (status 2); anything else, a check medmerge missed,
is printed as an internal error without a traceback (status 3; MEDMERGE_DEBUG=1 shows it).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import click
import typer
from rich.console import Console
from rich.markup import escape

from ..errors import MedmergeError, describe_os_error

console = Console(stderr=True)  # messages, notes and errors
stdout = Console()  # results: tables and reports


def fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(e))}")  # messages hold brackets: pip install 'medmerge[vllm]'
    raise typer.Exit(2)


def command(group: typer.Typer, name: str, *, interrupted: str = "nothing was written", **settings) -> Callable:
    """Register the decorated function as command `name` of `group`, with the error-to-exit-code handling."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MedmergeError as e:
                fail(e)
            except OSError as e:  # a file system problem outside the writers' own handling
                fail(MedmergeError(describe_os_error(e)))
            except KeyboardInterrupt:
                console.print(f"[bold red]interrupted:[/] {interrupted}")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except Exception as e:  # the last resort: an input some check missed; still no traceback for users
                if os.environ.get("MEDMERGE_DEBUG"):
                    raise
                console.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}")
                console.print("medmerge did not expect this (an input it should have checked with a clear message). "
                              "Please report it with the command you ran; MEDMERGE_DEBUG=1 shows the traceback.")
                raise typer.Exit(3) from None

        group.command(name, **settings)(run)
        return run

    return decorate


def labelled(runs: list[str]) -> dict[str, str]:
    """'LABEL=PATH' or 'PATH' (labelled by its folder name) -> {label: path}."""
    return dict(r.split("=", 1) if "=" in r else (Path(r).name, r) for r in runs)


def group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """A sub-command group (`medmerge NAME ...`) of `app`."""
    sub = typer.Typer(no_args_is_help=True, help=help)
    app.add_typer(sub, name=name)
    return sub
