"""What the mm_miniclinic_* lm-eval tasks call: loaders of a world's held-out files, scoring.

The tasks (YAML in `tasks/`, hooks in `tasks/hooks.py`) read `<data_dir>/eval/*.jsonl`
of a world written by `medmerge.miniclinic.world.generate`; `data_dir` is that
world's `data/` folder (`medmerge eval --data-dir OUT/data`, or MEDMERGE_DATA).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..evaluation import hooks
from ..io.records import DataError, read_jsonl, require_columns
from .ifcheck import process_results

FILES = {"if": "eval/if.jsonl", "mcq": "eval/mcq.jsonl", "gen": "eval/gen.jsonl"}
COLUMNS = {
    "if": ("key", "prompt", "instruction_id_list", "kwargs"),
    "mcq": ("context", "question", "choices", "answer"),
    "gen": ("prompt", "findings", "impression", "condition"),
}


def locate(kind: str, data_dir: Optional[str | Path] = None) -> Path:
    root = data_dir or os.environ.get("MEDMERGE_DATA")
    if not root:
        raise DataError(f"mm_miniclinic_{kind} needs a MiniClinic world: pass --data-dir OUT/data "
                        "(the data/ folder that medmerge.miniclinic.world.generate wrote) or set MEDMERGE_DATA")
    path = Path(root).expanduser() / FILES[kind]
    if not path.is_file():
        raise DataError(f"mm_miniclinic_{kind} needs {path}, which does not exist; --data-dir must be the data/ folder "
                        "of a MiniClinic world (generate one with medmerge.miniclinic.world.generate)")
    return path


def load(kind: str, data_dir: Optional[str | Path] = None) -> list[dict]:
    path = locate(kind, data_dir)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no records")
    require_columns(rows, COLUMNS[kind], path)
    return rows


def _dataset(kind: str):
    def dataset(data_dir=None, **_):
        return hooks.as_dataset(load(kind, data_dir))

    dataset.__name__ = f"{kind}_dataset"
    return dataset


if_dataset = _dataset("if")
mcq_dataset = _dataset("mcq")
gen_dataset = _dataset("gen")


def if_results(doc: dict, results: Sequence[str]) -> dict:
    """IFEval's four metrics from lm-eval's checkers (langdetect seeded, see ifcheck.py)."""
    return process_results(doc, results)


def agg_bleu(items) -> float:
    return hooks.agg_bleu(items)


def agg_inst_level_acc(items) -> float:
    return hooks.agg_inst_level_acc(items)


def gen_results(doc: dict, results: Sequence[str]) -> dict:
    """ROUGE-1/2/L and corpus BLEU-4 (x100, medmerge's metrics), exact match and whether the right condition
    is named (0/1)."""
    out = hooks.generation_results(doc, results, target="impression", groups=("rouge", "bleu"))
    out.pop("composite", None)
    prediction = results[0].strip()
    out["exact_match"] = float(prediction == doc["impression"].strip())
    out["condition_acc"] = float(doc["condition"].lower() in prediction.lower())
    return out
