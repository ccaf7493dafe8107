"""Reading record files (JSONL, JSON, CSV, TSV) with errors that name the file, the line and the column."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from ..errors import InputError


class DataError(InputError):
    """A data file (evaluation or training records) is missing or malformed."""


class NotText(DataError):
    """A file that should be text is not UTF-8 (a binary file, such as a model's weights, or another encoding)."""


def not_utf8(path: Path) -> NotText:
    """The error for a file that is not UTF-8 text, naming the first bad line and byte."""
    where = ""
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" (line {line}, byte {e.start}: {e.reason})"
    except OSError:
        pass
    return NotText(f"{path}: not UTF-8 text{where}; a data file must be UTF-8 text (.jsonl, .json, .csv, .tsv or "
                   ".txt): check that this is the right file, or re-save it as UTF-8")


def read_text(path: Path, newline: str | None = None) -> str:
    """The whole file as text, or a DataError naming the file when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); each line must be one JSON "
                                    "object")
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return rows


def read_json(path: Path, expect: type, what: str):
    """A whole JSON file that must hold a `expect` (dict or list); errors name the file and the line."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})")
    if not isinstance(obj, expect):
        raise DataError(f"{path}: expected {what}")
    return obj


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV, TSV, JSONL or JSON-list file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = read_jsonl(path)
    elif suffix == ".json":
        rows = read_json(path, list, "a JSON list of records")
    elif suffix in (".csv", ".tsv"):
        text = read_text(path, newline="")
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv, .jsonl or .json")
    if not rows:
        raise DataError(f"{path} holds no records")
    return rows


def require_columns(rows: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            have = ", ".join(sorted(map(str, row))) or "none"
            where = f"line {i + 2}" if path.suffix.lower() in (".csv", ".tsv") else f"record {i + 1}"
            raise DataError(
                f"{path}, {where}: missing column(s) {', '.join(map(repr, missing))} (columns found: {have})"
            )
