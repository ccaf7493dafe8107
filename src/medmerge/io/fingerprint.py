"""Content hashes: one file's sha256, a set of files', and the fingerprint of a model or adapter folder.

A fingerprint is what medmerge records about the base a model or adapter was trained on
(`medmerge_train.json`, `medcare_config.json`), and `check_recorded_base` is the one check
that a base given later is that same base. `check_adapter_base` is the same-base check of an
adapter folder (its recorded fingerprint, else its config's `base_model_name_or_path`), shared by
`medmerge adapters merge` and `medmerge eval --peft`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TRAIN_RECORD = "medmerge_train.json"  # what `medmerge train` writes next to a model or adapter
EXTRACT_RECORD = "medmerge_extract.json"  # what `medmerge adapters extract` writes next to an adapter
ADAPTER_CONFIG = "adapter_config.json"
# config.json keys that do not change what the weights mean (ignored when two bases' configs are compared)
_CONFIG_IGNORE = ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "use_cache", "architectures")


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


def recorded_base_fingerprint(folder: Path) -> str | None:
    """The base fingerprint recorded next to an adapter by `medmerge train` (medmerge_train.json) or `medmerge
    adapters extract` (medmerge_extract.json), if any."""
    record = next((Path(folder) / n for n in (TRAIN_RECORD, EXTRACT_RECORD) if (Path(folder) / n).is_file()), None)
    if record is None:
        return None
    try:
        found = json.loads(record.read_text(encoding="utf-8"))["base"]["fingerprint"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return found if isinstance(found, str) and found else None


def recorded_base_name(folder: Path) -> str | None:
    """An adapter's `base_model_name_or_path` (adapter_config.json), if it names one."""
    try:
        name = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def arch_config(file: Path) -> dict:
    """A config.json's contents without the keys that do not change what the weights mean ({} if unreadable)."""
    try:
        cfg = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in cfg.items() if k not in _CONFIG_IGNORE} if isinstance(cfg, dict) else {}


def check_adapter_base(base: Path, adapter: Path, *, recorded: str | None = None, base_name: str | None = None,
                       fix: str = "pass the base it was trained on (--no-base-check skips this check)") -> str | None:
    """Raise an InputError when the adapter folder `adapter` was trained on another base than `base`.

    First choice: the base fingerprint `medmerge train` recorded (sha256 over the base's weights and
    configs), compared with `base`'s; then None is returned. Otherwise the adapter's
    `base_model_name_or_path`: when it is a local folder, its config.json must match `base`'s
    (architecture fields) and, when it is another folder, its weights too; the returned note says
    what could be checked. `recorded` and `base_name` default to what the adapter folder records.
    """
    adapter = Path(adapter)
    recorded = recorded or recorded_base_fingerprint(adapter)
    if recorded:
        check_recorded_base(base, recorded, trained=f"adapter {adapter}", fix=fix)
        return None
    name = base_name or recorded_base_name(adapter)
    folder = Path(name).expanduser() if name else None
    if folder is None or not (folder / "config.json").is_file():
        return (f"adapter {adapter}: no recorded base fingerprint and its base {name!r} is not a local "
                "folder; only module names and shapes were checked")
    if arch_config(folder / "config.json") != arch_config(base / "config.json"):
        raise InputError(f"adapter {adapter} was trained on another base, {folder}, whose config.json differs from "
                         f"{base}'s; {fix}")
    if folder.resolve() == base.resolve():
        return f"adapter {adapter}: no recorded base fingerprint; trained on this base folder"
    if fingerprint(folder) != fingerprint(base):  # another local folder with the same architecture: same weights?
        raise InputError(f"adapter {adapter} was trained on another base, {folder}, whose weights differ from "
                         f"{base}'s (same architecture, other fingerprint); {fix}")
    return f"adapter {adapter}: trained on {folder}, which holds the same weights as {base}"
