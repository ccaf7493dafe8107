"""Streamed rewrites of a checkpoint: read ahead, transform one tensor at a time, write shards, check the bytes.

`write_transformed` is the generic path that adapter merges and MedCare exports share:
every tensor of a base checkpoint goes through `transform(name, W0)` and is written into
sharded safetensors with the base's config and tokenizer, so memory holds a couple of
tensors whatever the model's size. `readback_problems` then reads every written tensor back
and compares its CRC-32 with what was computed.
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..runtime import progress as progress_bar
from .checkpoint import Checkpoint
from .folders import copy_support_files, with_dtype, write_config
from .writer import OutTensor, ShardedWriter


def prefetch(read: Callable[[str], torch.Tensor], names: Sequence[str], depth: int = 2) -> Iterator[torch.Tensor]:
    """read(name) for each name, in order, with up to `depth` reads running ahead in a thread
    (file reads release the GIL, so reading overlaps computing); memory: `depth` tensors."""
    with ThreadPoolExecutor(1) as pool:
        queue: deque = deque()
        for name in names[:depth]:
            queue.append(pool.submit(read, name))
        for i in range(len(names)):
            value = queue.popleft().result()
            if i + depth < len(names):
                queue.append(pool.submit(read, names[i + depth]))
            yield value


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (as the writer stores them)."""
    t = t.detach().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def write_transformed(base: Checkpoint, folder: Path,
                      transform: Callable[[str, torch.Tensor], torch.Tensor], *,
                      out_dtype: Optional[torch.dtype], shard_size: int, description: str, metadata: dict,
                      progress: bool) -> dict[str, int]:
    """Stream `base` into `folder` as sharded safetensors, writing transform(name, W0) for every tensor.

    Reads run ahead in a thread and writes happen in another, in order, one tensor at a time; the config
    (with `out_dtype`) and tokenizer files are copied. Returns every written tensor's CRC-32 (for
    `readback_problems`).
    """
    order = sorted(base.records.values(), key=lambda r: (str(r.file), r.start))
    tensors = [OutTensor(r.name, out_dtype if (out_dtype and r.torch_dtype.is_floating_point) else r.torch_dtype,
                         tuple(r.shape)) for r in order]
    writer = ShardedWriter(folder, tensors, shard_size, metadata=metadata)
    checksums: dict[str, int] = {}

    def write(name: str, w: torch.Tensor) -> None:
        writer.begin(name)
        writer.write(w)
        checksums[name] = checksum(w)

    with progress_bar(progress) as bar, ThreadPoolExecutor(1) as io:
        task = bar.add_task(description, total=len(tensors))
        written = None
        for t, w0 in zip(tensors, prefetch(base.read, [t.name for t in tensors])):
            w = transform(t.name, w0).to(t.dtype)
            if written is not None:
                written.result()  # in order, one tensor at a time
            written = io.submit(write, t.name, w)
            bar.advance(task)
        if written is not None:
            written.result()
    writer.close()
    write_config(folder, with_dtype(base.config, out_dtype))
    copy_support_files(base.path, folder)
    return checksums


def readback_problems(folder: Path, checksums: dict[str, int]) -> list[str]:
    """Every tensor as read back from the written files has the bytes that were computed."""
    out = Checkpoint(folder)
    names = list(checksums)
    problems = [f"tensor {n} read back from {folder} differs from what was written (CRC-32)"
                for n, t in zip(names, prefetch(out.read, names)) if checksum(t) != checksums[n]]
    out.close()
    return problems
