"""Content fingerprints of model and adapter folders (sha256 over weights and JSON configs)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and contents: changes whenever the weights or configs do."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def model_files(path: Path) -> list[Path]:
    """Weights and JSON configs of a model or adapter folder (not tokenizer files, logs or medmerge records)."""
    keep = [p for p in Path(path).iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".json")]
    skip = ("tokenizer", "trainer_state", "medmerge_train", "special_tokens", "chat_template")
    return [p for p in keep if p.is_file() and not p.name.startswith(skip)]


def fingerprint(path: str | Path) -> str:
    """sha256 over a folder's weights and configs; cached in this process while no file's size or mtime changes
    (hashing an 8B base takes about a minute, and a pipeline checks the same base many times)."""
    files = model_files(Path(path))
    key = tuple(sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    return _cached(key)


@functools.lru_cache(maxsize=32)
def _cached(key: tuple) -> str:
    return file_sha256([Path(name) for name, _, _ in key])
