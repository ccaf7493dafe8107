"""Content hashes: one file's sha256, a set of files', and the fingerprint of a model or adapter folder.

A fingerprint is what medmerge records about the base a model or adapter was trained on
(`medmerge_train.json`, `medcare_config.json`), and `check_recorded_base` is the one check
that a base given later is that same base.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

from ..errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def sha256_file(path: Path) -> str:
    """The sha256 of one file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and contents: changes whenever the weights or configs do."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(path)))
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
    return files_sha256([Path(name) for name, _, _ in key])


def check_recorded_base(base: Path, recorded: str, *, trained: str, fix: str) -> str:
    """`base`'s fingerprint, or an InputError when it is not the `recorded` one of the base `trained` was
    trained on (e.g. "adapter runs/pt", "stage 1 (runs/s1)"); `fix` says what to pass instead."""
    found = fingerprint(base)
    if found != recorded:
        raise InputError(f"base model {base} is not the one {trained} was trained on: its recorded base fingerprint "
                         f"{recorded[:12]}... differs from this base's {found[:12]}...; {fix}")
    return found
