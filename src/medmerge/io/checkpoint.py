"""Read local Hugging Face model folders tensor by tensor.

Safetensors headers are parsed and checked (offsets, sizes, truncation) when a
checkpoint is opened, before any tensor data is read. Tensors are then read
with positional reads (`os.pread`) into fresh buffers: one copy, thread-safe,
and no memory-mapped pages left counting against the process.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorRecord:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where data starts); raise InputError if corrupt."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{file}: not a safetensors file (only {size} bytes); re-save or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(
                f"{file}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file); "
                "the file is damaged or truncated: re-save or re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{file}: corrupt safetensors header ({e}); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise InputError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def _count(value) -> bool:
    """A non-negative whole number as JSON gives it (an int, not a bool or a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def scan_safetensors(file: Path) -> dict[str, TensorRecord]:
    header, data_start = read_safetensors_header(file)
    size = file.stat().st_size
    records = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{file}: corrupt header entry for tensor {name!r}") from None
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise InputError(f"{file}: tensor {name!r} has shape {json.dumps(shape)} in its header, but a shape is "
                             "a list of non-negative whole numbers; the file is corrupt: re-save or re-download it")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise InputError(f"{file}: tensor {name!r} has data_offsets {json.dumps(offsets)} in its header, but "
                             "they are two non-negative whole numbers, begin <= end; the file is corrupt: re-save or "
                             "re-download it")
        shape, (begin, end) = tuple(shape), offsets
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected or begin < 0:
            raise InputError(
                f"{file}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} {dtype} needs "
                f"{expected}; the file is corrupt"
            )
        if data_start + end > size:
            raise InputError(
                f"{file}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes; re-download or re-save the shard"
            )
        records[name] = TensorRecord(name, file, dtype, shape, data_start + begin, data_start + end)
    return records


def looks_like_hub_id(ref: str) -> bool:
    return (
        ref.count("/") == 1
        and not ref.startswith((".", "/", "~"))
        and all(part and not part.startswith(".") for part in ref.split("/"))
    )


# `model+lora` references (mergekit's syntax): a function (base folder, adapter folder) -> folder of the base with
# the adapter applied. The adapters layer registers it (`medmerge.adapters`); the io layer cannot apply one.
LORA_RESOLVER = []


def split_lora_ref(ref: str, relative_to: Optional[Path] = None) -> Optional[tuple[str, str]]:
    """(model, adapter) of a `model+lora` reference; None for a plain one. A path that exists as it is (a '+' in a
    folder name) is plain; otherwise it splits at the last '+' whose two sides are both folders."""
    if "+" not in ref or _existing(ref, relative_to) is not None:
        return None
    parts = ref.split("+")
    for k in range(len(parts) - 1, 0, -1):
        model, adapter = "+".join(parts[:k]), "+".join(parts[k:])
        if _existing(model, relative_to) is not None and _existing(adapter, relative_to) is not None:
            return model, adapter
    k = len(parts) - 1  # neither split names two folders: report the last one's sides
    return "+".join(parts[:k]), "+".join(parts[k:])


def _candidates(ref: str, relative_to: Optional[Path]) -> list[Path]:
    """Where a reference may point: as given, then relative to the config's folder."""
    return [Path(ref).expanduser()] + ([relative_to / ref] if relative_to is not None and
                                       not Path(ref).is_absolute() else [])


def _existing(ref: str, relative_to: Optional[Path]) -> Optional[Path]:
    return next((p for p in _candidates(ref, relative_to) if p.is_dir()), None)


def resolve_model_path(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A local folder for a model reference, or an InputError that says what to pass.

    `MODEL+ADAPTER` (mergekit's syntax) gives the folder of MODEL with the PEFT adapter applied exactly (built
    once and cached by the adapters layer: `medmerge.adapters.materialize`)."""
    lora = split_lora_ref(ref, relative_to)
    if lora is not None:
        model, adapter = (resolve_model_path(part, relative_to) for part in lora)
        if not LORA_RESOLVER:
            raise InputError(f"model {ref!r}: a 'model+lora' reference needs medmerge's adapter layer; import "
                             "medmerge (or medmerge.adapters) before merging")
        return LORA_RESOLVER[0](model, adapter)
    candidates = _candidates(ref, relative_to)
    found = _existing(ref, relative_to)
    if found is not None:
        return found.resolve()
    for path in candidates:
        if path.is_file():
            raise InputError(f"model {ref!r} is a file; pass the model folder that holds it ({path.parent}), with its "
                             "config.json and tokenizer")
    if looks_like_hub_id(ref):
        raise InputError(
            f"model {ref!r} is not a local folder and looks like a Hugging Face hub id; medmerge works "
            "offline: download it where you have network access (huggingface-cli download) and pass the local path"
        )
    raise InputError(f"model folder {ref!r} does not exist; pass the path of a local model folder")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _refused(e: Exception) -> str:
    """The line of torch's weights-only refusal that names what the pickle asked for."""
    m = re.search(r"(Trying to load unsupported GLOBAL[^\n]*|Unsupported (?:global|operand)[^\n]*)", str(e))
    return m.group(1).strip() if m else _first_line(e)


def load_tensor_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint's flat {name: tensor} dict, read with torch's weights-only unpickler.

    That unpickler builds tensors and plain containers only and refuses anything else before
    running it, so a file that would execute code (a `__reduce__` payload) is refused with
    nothing executed.
    """
    def load(mmap: bool):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            state = load(mmap=False)  # a legacy (not zip) torch.save file, or not a torch file at all
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{file} is not a plain tensor checkpoint; nothing was executed: it holds Python objects that only "
            f"unpickling with code execution could build ({_refused(e)}). Do not load it with weights_only=False "
            "unless you trust its source; ask the source for a safetensors copy, or, where you trust it, re-save "
            "only its tensors (safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None
    # whatever else a damaged or foreign file makes the (code-free) weights-only unpickler raise
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError,
            struct.error, zipfile.BadZipFile) as e:
        raise InputError(f"{file}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)}); the file "
                         "is damaged or of another format: re-download it or convert it to safetensors") from None
    if not isinstance(state, dict):
        raise InputError(f"{file} holds a {type(state).__name__}, not a state dict of tensors; save the model's "
                         "state_dict as safetensors and pass that")
    odd = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise InputError(f"{file}: entry {odd[0]!r} is not a tensor, so this is not a flat state dict (a training "
                         "checkpoint?); save the model's own state_dict (e.g. its 'state_dict' entry) as safetensors "
                         "and pass that")
    return state


class Checkpoint:
    """A local model folder: config, tokenizer files and lazily read tensors."""

    fresh_reads = True  # read() returns a new buffer the caller may overwrite

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.config = self._read_config()
        self.index_file: Optional[Path] = None
        self._pickled: Optional[dict[str, torch.Tensor]] = None
        self.records = self._scan(allow_pickle)
        self.files = sorted({r.file for r in self.records.values()})
        self._fds: dict[Path, int] = {}

    @property
    def label(self) -> str:
        return str(self.path)

    def _read_config(self) -> dict:
        file = self.path / "config.json"
        if not file.is_file():
            return {}
        try:
            config = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise InputError(f"{file}: expected a JSON object (the model's settings: model_type, hidden_size, ...), "
                             f"got a {type(config).__name__}; restore the config.json saved with the model")
        return config

    def _scan(self, allow_pickle: bool) -> dict[str, TensorRecord]:
        index = self.path / INDEX_NAME
        if index.is_file():
            self.index_file = index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{index}: invalid index ({e}); it needs a 'weight_map'") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index}: invalid index: its 'weight_map' must map each tensor name to the file "
                                 "that holds it; re-save the model or restore the index")
            # only the shards the index names count, and each tensor is read from the shard it names
            by_shard = {}
            for shard in sorted(set(weight_map.values())):
                file = self.path / shard
                if not file.is_file():
                    raise InputError(f"{index} names shard {shard}, which is missing from {self.path}")
                by_shard[shard] = scan_safetensors(file)
            records = {}
            for name, shard in weight_map.items():
                if name not in by_shard[shard]:
                    raise InputError(f"{index}: tensor {name!r} is mapped to {shard} but is not in that shard")
                records[name] = by_shard[shard][name]
            return records
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            records = {}
            for file in shards:
                for name, record in scan_safetensors(file).items():
                    if name in records:
                        raise InputError(
                            f"{self.path}: tensor {name!r} is in both {records[name].file.name} and {file.name}, and "
                            f"there is no {INDEX_NAME} to say which file is the model: move the stray file (a backup "
                            "or another model's copy) out of the folder, or add an index naming the shards")
                    records[name] = record
            return records
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            if not allow_pickle:
                raise InputError(
                    f"{self.path} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}); "
                    "pickle files can run code when loaded. Convert them to safetensors, or pass "
                    "--allow-pickle if you trust their source"
                )
            return self._load_pickles(pickles)
        raise InputError(f"{self.path}: no model weights found (no *.safetensors, no {INDEX_NAME})")

    def _load_pickles(self, files: list[Path]) -> dict[str, TensorRecord]:
        self._pickled = {}
        records = {}
        for file in files:
            state = load_tensor_pickle(file)
            for name, tensor in state.items():
                if tensor.dtype not in DTYPE_NAMES:
                    raise InputError(f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}; "
                                     "convert the checkpoint to one of " + ", ".join(map(str, DTYPE_NAMES)))
                if name in records:
                    raise InputError(f"{self.path}: tensor {name!r} is in both {records[name].file.name} and "
                                     f"{file.name}: move the stray file (a backup or another model's copy) out of "
                                     "the folder")
                self._pickled[name] = tensor
                nbytes = tensor.numel() * tensor.element_size()
                records[name] = TensorRecord(name, file, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), 0, nbytes)
        return records

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Read one tensor (or rows [r0, r1) of its first axis) into a fresh CPU tensor."""
        rec = self.records[name]
        if self._pickled is not None:
            t = self._pickled[name]
            return (t if rows is None else t[rows[0] : rows[1]]).clone()
        start, shape = rec.start, rec.shape
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * itemsize(rec.dtype)
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0],) + tuple(shape[1:])
        nbytes = math.prod(shape) * itemsize(rec.dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)  # uninitialized: no zero-fill pass
        fd = self._fd(rec.file)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise InputError(f"{rec.file}: unexpected end of file reading tensor {name!r}")
            done += got
        return buf.view(rec.torch_dtype).reshape(shape)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
