"""Streaming sharded safetensors writer and atomic output folders.

Every output tensor's name, dtype and shape is known from the plan before the
first one is computed, so shard assignment and headers are written up front and
tensor bytes are then appended in plan order: nothing is buffered beyond the
chunk being written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import InputError, OutputExistsError
from .checkpoint import DTYPE_NAMES, INDEX_NAME, itemsize

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 bytes; '512MiB' -> 536_870_912; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"cannot read size {text!r}: use bytes with a unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(DTYPE_NAMES[self.dtype])


class ShardedWriter:
    """Write tensors, in the declared order, into shards of at most `shard_size` bytes."""

    def __init__(self, folder: Path, tensors: list[OutTensor], shard_size: int, metadata: Optional[dict] = None):
        self.folder = Path(folder)
        self.tensors = tensors
        shards: list[list[OutTensor]] = [[]]
        used = 0
        for t in tensors:
            if shards[-1] and used + t.nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append(t)
            used += t.nbytes
        n = len(shards)
        self.shard_names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0  # position in _order of the next tensor to begin
        self._shard = -1
        self._remaining = 0  # bytes still expected for the current tensor
        self._file = None
        self.bytes_written = 0

    def _open_shard(self, shard: int) -> None:
        if self._file:
            self._file.close()
        self._shard = shard
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.folder / self.shard_names[shard], "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    @property
    def current(self) -> OutTensor:
        return self._order[self._next - 1][1]

    def begin(self, name: str) -> None:
        """Start the next tensor, which must be `name`."""
        if self._remaining:
            raise RuntimeError(f"tensor {self.current.name} is incomplete")
        if self._next >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name}")
        shard, tensor = self._order[self._next]
        if tensor.name != name:
            raise RuntimeError(f"writer expected {tensor.name}, got {name}")
        if shard != self._shard:
            self._open_shard(shard)
        self._next += 1
        self._remaining = tensor.nbytes

    def write(self, data: torch.Tensor) -> None:
        """Append bytes of the current tensor (a whole tensor or consecutive rows)."""
        data = data.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        if len(raw) > self._remaining:
            raise RuntimeError(f"too many bytes for {self.current.name}")
        self._file.write(raw)
        self._remaining -= len(raw)
        self.bytes_written += len(raw)

    def close(self) -> None:
        if self._remaining or self._next != len(self._order):
            raise RuntimeError("the writer was closed before every tensor was written")
        if self._file:
            self._file.close()
            self._file = None
        weight_map = {t.name: self.shard_names[i] for i, shard in enumerate(self.shards) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in self.tensors)}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder; choose another path")
    if _is_nonempty_dir(out) and not force:
        raise OutputExistsError(f"output folder {out} exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it into place only on success.

    On any exception, Ctrl-C or SIGTERM the temporary folder is removed and an
    existing `out` is left as it was.
    """
    out = Path(out).absolute()
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.medmerge-tmp-", dir=out.parent))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.medmerge-old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
