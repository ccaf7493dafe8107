"""`model+lora` references in merge configs: the base with the adapter applied exactly, built once and cached.

mergekit's `model: BASE+ADAPTER` merges a PEFT adapter into its base before planning (with PEFT, into its
`--lora-merge-cache`). Here the adapter is applied by medmerge's own exact adapter merge (W = W0 + s B A, on the
deltas; the same code as `medmerge adapters merge`, with its base check and verification) into a folder of the
cache named by sha256 over both folders' fingerprints: a changed base or adapter is a new entry, an unchanged
pair is reused. Processes that need the same entry at once wait on one lock; one builds it, the others read it.

The cache is MEDMERGE_LORA_CACHE, else lora_merged/ in medmerge's cache folder (runtime.cache_root).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..io.fingerprint import fingerprint
from ..runtime import cache_root, note
from .merge import merge_adapters

RECORD = "medmerge_lora.json"


def cache_dir() -> Path:
    env = os.environ.get("MEDMERGE_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    return cache_root() / "lora_merged"


def _complete(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / RECORD).read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def materialize(base: Path, adapter: Path, cache: Optional[Path] = None) -> Path:
    """The folder of `base` with `adapter` applied exactly: from the cache, or built into it now."""
    cache = Path(cache) if cache is not None else cache_dir()
    base_fp, adapter_fp = fingerprint(base), fingerprint(adapter)
    key = hashlib.sha256(f"{base_fp}:{adapter_fp}".encode()).hexdigest()[:24]
    target = cache / key
    if _complete(target, key):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{key}.lock", "a") as lock:  # left in place: removing it would race its next user
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a process building the same entry; released on exit or death
        if _complete(target, key):
            return target
        note(f"applying adapter {adapter} to {base} (exactly; cached in {target})")
        # the entry is this cache's own (a half-built one from an interrupted run is replaced)
        merge_adapters(base, [(adapter, 1.0)], target, method="exact", as_="full", force=True, progress=False)
        (target / RECORD).write_text(json.dumps({"key": key, "base": {"path": str(base), "fingerprint": base_fp},
                                                 "adapter": {"path": str(adapter), "fingerprint": adapter_fp}},
                                                indent=2) + "\n")
    return target
