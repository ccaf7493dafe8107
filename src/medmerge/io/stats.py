"""Calibration statistics of a model (`medmerge stats`), stored as safetensors and read tensor by tensor.

A STATS folder holds sharded safetensors (with an index, like a model) and `medmerge_stats.json`. Its tensors
are named `<kind>/<weight name>`:

- `gram/<name>`: for the weight of a linear layer (shape [out, in]), the inner-product matrix of that layer's
  inputs over the calibration tokens, divided by their number: X^T X / n, shape [in, in] (RegMean).
- `fisher/<name>`: for any parameter, the diagonal empirical Fisher: the mean over calibration examples of the
  squared gradient of the example's mean token log-likelihood, the parameter's shape (Fisher merging).

The record says which model the statistics were computed on (its folder and fingerprint), from which data,
and how; a merge checks it against its input before reading a tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError
from .checkpoint import Checkpoint

STATS_RECORD = "medmerge_stats.json"
KINDS = ("gram", "fisher")
FORMAT = 1


def stats_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


class StatsFolder:
    """A STATS folder opened for reading: its record, and its tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        record_file = self.path / STATS_RECORD
        if not self.path.is_dir():
            raise InputError(f"statistics folder {self.path} does not exist; compute it with "
                             "`medmerge stats MODEL --data FILE --out STATS`")
        if not record_file.is_file():
            raise InputError(f"{self.path} is not a statistics folder: it has no {STATS_RECORD}; compute it with "
                             "`medmerge stats MODEL --data FILE --out STATS`")
        try:
            self.record = json.loads(record_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{record_file}: invalid JSON ({e}); recompute the statistics") from None
        if not isinstance(self.record, dict) or self.record.get("format") != FORMAT:
            raise InputError(f"{record_file}: not a medmerge statistics record of format {FORMAT}; recompute the "
                             "statistics with this version's `medmerge stats`")
        self._checkpoint = Checkpoint(self.path)
        self.records = self._checkpoint.records

    @property
    def kinds(self) -> list[str]:
        return list(self.record.get("kinds", []))

    def has(self, kind: str, name: str) -> bool:
        return stats_key(kind, name) in self.records

    def shape(self, kind: str, name: str) -> Optional[tuple[int, ...]]:
        rec = self.records.get(stats_key(kind, name))
        return None if rec is None else tuple(rec.shape)

    def read(self, kind: str, name: str) -> torch.Tensor:
        return self._checkpoint.read(stats_key(kind, name))

    def close(self) -> None:
        self._checkpoint.close()


def expected_shape(kind: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a statistic of `kind` has for a weight of `weight_shape`."""
    return (weight_shape[1], weight_shape[1]) if kind == "gram" else tuple(weight_shape)
