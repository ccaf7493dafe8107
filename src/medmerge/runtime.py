"""The run environment every layer shares: library versions for records, the device, progress bars, plots."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import MedmergeError

T = TypeVar("T")

DEVICES = "auto, cpu, cuda or cuda:N"


def library_versions(*packages: str) -> dict[str, str]:
    """{"medmerge": ..., package: version, ...} for a record; a package that is missing says so."""
    out = {"medmerge": __version__}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_device(name: str, flag: str = "--device") -> str:
    """'auto' -> 'cuda' where a CUDA device is available, else 'cpu'; 'cpu', 'cuda', 'cuda:N' as given.

    Any other name, or CUDA asked for where there is none, is an error naming `flag`, before any work starts.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise MedmergeError(f"{flag} must be {DEVICES}, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedmergeError(f"{flag} {name} was asked for but no CUDA device is available; use {flag} cpu or auto")
    return name


def progress(enabled: bool = True, *, unit: str = "items", transient: bool = False,
             fields: Sequence[str] = ()) -> Progress:
    """A rich progress bar with time left: counts of items (`unit="items"`) or bytes (`unit="bytes"`).

    `fields` are extra task fields shown after the bar (e.g. the point being scored). A disabled bar
    is a no-op with the same interface, so callers never branch on `enabled`.
    """
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               DownloadColumn() if unit == "bytes" else MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(),
               *(TextColumn(f"{{task.fields[{f}]}}") for f in fields)]
    return Progress(*columns, disable=not enabled, transient=transient)


def track(items: Iterable[T], description: str, enabled: bool = True,
          label: Optional[Callable[[T], str]] = None) -> Iterator[T]:
    """Yield `items` under a progress bar; `label(item)` names the current one beside the bar."""
    items = list(items)
    with progress(enabled, fields=("item",)) as bar:
        task = bar.add_task(description, total=len(items), item="")
        for item in items:
            bar.update(task, item=label(item) if label else "")
            yield item
            bar.advance(task)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Deferred on purpose: matplotlib takes about half a second to import and only plotting steps need it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def note(message: str) -> None:
    """Tell the user something they should know but that is not an error (on stderr, CLI and notebook alike)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def process_rank() -> int:
    """This process's rank under `accelerate launch` or torchrun (0 when started alone)."""
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes `accelerate launch` or torchrun started (1 when started alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_processes(device: str) -> int:
    """Make several launched processes on CPU one gloo group; return the number of processes.

    accelerate builds a process group on CPU only when it is told the run is on CPU (ACCELERATE_USE_CPU),
    which its `--cpu` flag sets but only for the one process it then starts (several CPU processes need
    mpirun there). Launched by `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node
    N` with `device` cpu, each process would otherwise run alone on all the data; this sets the flag so
    that accelerate (and lm-eval's and transformers' use of it) forms one DDP group over gloo.
    """
    n = process_count()
    if n > 1 and device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif n == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
            and os.environ.get("ACCELERATE_MIXED_PRECISION") is not None and process_rank() == 0:
        note("running as one process: `accelerate launch --cpu` starts several CPU processes only through mpirun "
             "(--mpirun_hostfile); for N processes on CPU use `accelerate launch --multi_gpu --num_processes N` "
             "or `torchrun --nproc_per_node N` (medmerge then runs them on CPU over gloo)")
    return n


def cache_root() -> Path:
    """medmerge's cache folder: MEDMERGE_CACHE, else $XDG_CACHE_HOME/medmerge, else ~/.cache/medmerge."""
    env = os.environ.get("MEDMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "medmerge"
