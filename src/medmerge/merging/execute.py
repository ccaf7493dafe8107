"""Streaming execution: read, merge and write one tensor (or row chunk) at a time.

Three stages overlap in threads: a reader prefetches the next unit's inputs
(bounded by a byte budget, so at most one large tensor is in flight), the
calling thread merges, and a writer appends results to the output shards.
Elementwise methods (linear, task arithmetic, ...) stream row chunks straight
from the input files, so their memory does not grow with tensor size.
"""

from __future__ import annotations

import ctypes
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .compute import load_inputs, merge_loaded, row_chunks
from ..io.checkpoint import itemsize
from ..io.writer import ShardedWriter
from ..runtime import progress as progress_bar
from .plan import MergePlan

CHUNK_ELEMENTS = 4 * 1024 * 1024  # elements per elementwise chunk: 16 MB of float32 per input
PREFETCH_BYTES = 512 * 1024 * 1024


@dataclass
class StreamStats:
    tensors: int
    units: int
    bytes_written: int
    seconds: float


class _ByteBudget:
    """At most `cap` bytes in flight; a unit larger than `cap` runs alone."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        n = min(n, self.cap)
        with self.cond:
            while self.used and self.used + n > self.cap:
                if stop.is_set():
                    raise _Stopped
                self.cond.wait(0.1)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= min(n, self.cap)
            self.cond.notify_all()


class _Stopped(Exception):
    pass


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped from None


def plan_units(plan: MergePlan, chunk_elements: int = CHUNK_ELEMENTS):
    units = []
    for tp in plan.tensors:
        chunks = row_chunks(tp, chunk_elements) if plan.elementwise(tp) else [None]
        for i, rows in enumerate(chunks):
            units.append((tp, rows, i == 0))
    return units


def _unit_input_bytes(plan: MergePlan, tp, rows) -> int:
    total = 0
    for i, source in zip(plan.inputs_of(tp), tp.sources):
        rec = plan.models[i].records[source]
        n = math.prod(rec.shape)
        if rows is not None:
            n = n // rec.shape[0] * (rows[1] - rows[0])
        # held in the working dtype once the reader has converted it
        total += n * (plan.work_dtype.itemsize if tp.mergeable else itemsize(rec.dtype))
    return total


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc to serve large buffers from its heap and keep freed ones.

    By default every buffer over a few MB is a fresh mmap, and each of its pages
    faults and is zeroed on first touch; a merge allocates such buffers for every
    chunk, which costs more system time than reading the file. Keeping freed
    memory makes later buffers reuse already-mapped pages. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: chunk buffers fit below it
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def stream_merge(
    plan: MergePlan,
    writer: ShardedWriter,
    *,
    device: Optional[torch.device] = None,
    progress: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    prefetch_bytes: int = PREFETCH_BYTES,
) -> StreamStats:
    keep_freed_memory_for_reuse()
    units = plan_units(plan, chunk_elements)
    stop = threading.Event()
    budget = _ByteBudget(prefetch_bytes)
    read_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    total_bytes = sum(tp.nbytes for tp in plan.tensors)
    start = time.perf_counter()

    def reader():
        try:
            for tp, rows, first in units:
                size = _unit_input_bytes(plan, tp, rows)
                budget.acquire(size, stop)
                tensors, owned = load_inputs(plan, tp, rows)
                _put(read_q, (tp, rows, first, tensors, owned, size), stop)
                del tensors
            _put(read_q, None, stop)
        except _Stopped:
            pass
        except BaseException as e:  # handed to the main thread
            errors.append(e)
            stop.set()

    done = {"tensors": 0}

    def write_loop(task_id):
        try:
            while True:
                item = _get(write_q, stop)
                if item is None:
                    return
                tp, first, last, result = item
                if first:
                    writer.begin(tp.name)
                writer.write(result)
                if last:
                    done["tensors"] += 1
                bar.update(task_id, advance=result.numel() * result.element_size(),
                           description=f"merging {done['tensors']}/{len(plan.tensors)} tensors")
        except _Stopped:
            pass
        except BaseException as e:
            errors.append(e)
            stop.set()

    with progress_bar(progress, unit="bytes") as bar:
        task_id = bar.add_task(f"merging 0/{len(plan.tensors)} tensors", total=total_bytes)
        threads = [
            threading.Thread(target=reader, name="medmerge-read", daemon=True),
            threading.Thread(target=write_loop, args=(task_id,), name="medmerge-write", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            while True:
                item = _get(read_q, stop)
                if item is None:
                    break
                tp, rows, first, tensors, owned, size = item
                del item
                result = merge_loaded(plan, tp, tensors, device=device, owned=owned)
                budget.release(size)
                last = rows is None or rows[1] == tp.shape[0]
                _put(write_q, (tp, first, last, result), stop)
                del result
            _put(write_q, None, stop)
            threads[1].join()
        except _Stopped:
            pass
        finally:
            stop.set()  # releases the helper threads if the main thread failed
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
    return StreamStats(
        tensors=len(plan.tensors),
        units=len(units),
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - start,
    )

