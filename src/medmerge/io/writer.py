"""Streaming sharded safetensors writer and atomic output folders.

Every output tensor's name, dtype and shape is known from the plan before the
first one is computed, so shard assignment and headers are written up front and
tensor bytes are then appended in plan order: nothing is buffered beyond the
chunk being written.
"""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from ..errors import InputError, OutputError, OutputExistsError, describe_os_error
from ..runtime import note
from .checkpoint import DTYPE_NAMES, INDEX_NAME, itemsize
from .paths import PathLike, check_not_input

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"cannot read size {text!r}: use bytes with a unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 bytes; '512MiB' -> 536_870_912; a bare number is bytes; 0 bytes is refused."""
    size = _bytes(text)
    if size < 1:
        raise InputError(f"size {text!r} is 0 bytes; give a positive size with a unit, e.g. 5GB, 500MB, 2GiB")
    return size


MIN_SHARD_SIZE = 1000  # bytes: a smaller shard holds a few hundred numbers; "5" (meant 5GB) is a typo


def shard_size(value: "int | str") -> int:
    """The largest output shard in bytes, from '5GB' or a number of bytes; at least MIN_SHARD_SIZE.

    A size below a kilobyte is a slip (0, '0.4' which is 0 bytes, or '5' meaning 5GB) that would
    write one shard per tensor, so it is refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"shard size {value!r}: give bytes with a unit, e.g. 5GB, 500MB, 2GiB; it must be at "
                         "least 1KB")
    size = value if isinstance(value, int) else _bytes(value)
    if size < MIN_SHARD_SIZE:
        raise InputError(f"shard size {value!r} is {max(size, 0):,} bytes, but a shard must be at least 1KB "
                         "(a bare number is bytes: write 5GB, not 5; models are usually sharded at 1GB-5GB)")
    return size


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


def output_path(out: PathLike) -> Path:
    """OUT as given, with `~` expanded (a quoted '~/merged' reaches us unexpanded, as the inputs do)."""
    return Path(out).expanduser()


def check_output(out: Path, force: bool, inputs: Iterable[Optional[PathLike]] = (), *, in_place: bool = False) -> None:
    """Refuse an output that would overwrite without --force, that is, holds or lies in an input, or (unless
    `in_place`: a folder written where it is, never renamed into place) that is a symbolic link."""
    out = output_path(out)
    try:
        _check_output(out, force, inputs, in_place)
    except OSError as e:  # a name too long, a symbolic-link loop, no permission to look: named, with the remedy
        raise OutputError(describe_os_error(e, out)) from None


def _check_output(out: Path, force: bool, inputs: Iterable[Optional[PathLike]], in_place: bool) -> None:
    if out.is_symlink() and not in_place:
        # the finished folder is renamed onto OUT, which would replace the link (and leave its target as it was)
        raise OutputError(f"output {out} is a symbolic link (to {os.readlink(out)}); pass the folder it points to "
                          f"({Path(os.path.realpath(out))}) or another path")
    check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder; choose another path")
    if _is_nonempty_dir(out) and not force:
        raise OutputExistsError(f"output folder {out} exists and is not empty; pass --force to replace it")


def check_space(out: Path, nbytes: int) -> None:
    """Refuse before writing when the file system holding `out` has less than `nbytes` free."""
    folder = Path(out).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OutputError(f"not enough space for {out}: it needs {nbytes:,} bytes and {folder} has {free:,} "
                          "free; free some space or choose an output on another disk")


def _hidden(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.medmerge-{kind}"


_held: dict[str, int] = {}  # output locks this process holds -> nesting depth
_LEGACY_STALE_S = 600  # a temp folder of an older medmerge (no pid in its name) this old is stale


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the one-writer lock of `out` (a flock on a hidden file beside it); re-entrant in one process.

    A second process that wants to write `out` at the same time is refused at once, naming the holder,
    instead of silently replacing the first one's output at the final rename.
    """
    out = output_path(out).absolute()
    key = str(out)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _hidden(out, "lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OutputExistsError(
                f"another medmerge process{f' (pid {holder})' if holder else ''} is writing {out} right now; "
                "wait for it to finish or choose another output") from None
        try:  # its previous holder may have removed the file between our open and our flock
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        try:
            os.unlink(lock)  # while still holding it, so no one else holds a lock on a removed file
        except OSError:
            pass
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders an earlier run to `out` left when it was killed (SIGKILL, power loss).

    Called with the output lock held. A folder whose owner process (its pid is in the name) is gone is
    removed, and the user is told; one whose owner still runs is left alone.
    """
    out = Path(out).absolute()
    removed = []
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{glob.escape(out.name)}.medmerge-{kind}-*"):
            m = re.fullmatch(rf"\.{re.escape(out.name)}\.medmerge-{kind}-(\d+)-.*", path.name)
            if m:
                if int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                    continue
                owner = f"process {m.group(1)}, which is no longer running"
            else:
                try:
                    if time.time() - path.stat().st_mtime < _LEGACY_STALE_S:
                        continue
                except OSError:
                    continue
                owner = "an earlier medmerge version"
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            note(f"removed {path}, a temporary folder left by {owner} (it was interrupted)")
    return removed


def current_umask() -> int:
    """The process's umask (what new files' permissions leave out)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(folder: Path) -> None:
    """Give a finished temporary folder and everything in it the user's usual permissions (umask): the folder
    was created owner-only, and transformers' save_pretrained writes its safetensors owner-only (0600) too."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it into place only on success.

    While it runs this process holds `out`'s one-writer lock; temporary folders that a killed earlier
    run left are removed first. On any exception, Ctrl-C or SIGTERM the temporary folder is removed and
    an existing `out` is left as it was. The finished folder gets the user's usual permissions (umask),
    not the owner-only mode of a temporary folder. OS errors (disk full, read-only file system, no
    permission) become errors naming the path and the remedy.
    """
    out = output_path(out).absolute()
    inputs = list(inputs)
    check_output(out, force, inputs)
    try:
        with output_lock(out):
            remove_stale_temporaries(out)
            check_output(out, force, inputs)  # another run may have finished it while we were planning
            existed = out.exists()
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.medmerge-tmp-{os.getpid()}-", dir=out.parent))
            previous = None
            if threading.current_thread() is threading.main_thread():
                previous = signal.getsignal(signal.SIGTERM)

                def on_term(signum, frame):
                    raise KeyboardInterrupt("SIGTERM")

                signal.signal(signal.SIGTERM, on_term)
            try:
                yield tmp
                usual_permissions(tmp)
                if out.exists():
                    if not existed and not force:
                        raise OutputExistsError(f"{out} appeared while this run was writing it; its output was "
                                                "not moved into place: choose another output or pass --force")
                    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.medmerge-old-{os.getpid()}-",
                                                  dir=out.parent))
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
    except OSError as e:  # name the file as the user knows it: under OUT, not the hidden temporary folder
        name = str(e.filename) if e.filename is not None else str(out)
        name = re.sub(rf"^{re.escape(str(out.parent))}/\.{re.escape(out.name)}\.medmerge-tmp-[^/]*", str(out), name)
        raise OutputError(describe_os_error(OSError(e.errno, e.strerror, name), out)) from e
