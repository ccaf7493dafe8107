"""Content fingerprints of model and adapter folders (sha256 over weights and JSON configs)."""

from __future__ import annotations

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
    return file_sha256(model_files(Path(path)))
