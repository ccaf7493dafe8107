"""Local evaluation data: where each shipped task looks in the data directory, and loaders.

Nothing reads a hub. The data directory comes from `--data-dir`, the task
metadata key `data_dir`, or `MEDMERGE_DATA`; its layout mirrors the public
copies (see docs/evaluation.md). Every loader checks its file and its columns
and names what is missing, where it was looked for and where a public copy
lives.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..io.records import DataError, read_json, read_jsonl, read_table, require_columns


@dataclass(frozen=True)
class Source:
    """Where a data set lives inside the data directory and where its public copy is."""

    task: str
    candidates: tuple[str, ...]  # paths relative to the data directory, first found wins
    public: str


SOURCES = {
    "ifeval": Source(
        "mm_ifeval", ("ifeval/input_data.jsonl",),
        "https://github.com/google-research/google-research/blob/master/instruction_following_eval/data/input_data.jsonl",
    ),
    "mts_dialog": Source(
        "mm_mts_dialog", ("mts_dialog/Main-Dataset/MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv",),
        "https://github.com/abachaa/MTS-Dialog/tree/main/Main-Dataset",
    ),
    "mts_dialog_train": Source(
        "(training data)", ("mts_dialog/Main-Dataset/MTS-Dialog-TrainingSet.csv",),
        "https://github.com/abachaa/MTS-Dialog/tree/main/Main-Dataset",
    ),
    "medquad": Source(
        "(training data)", ("medquad/medquad_sample_500.jsonl", "medquad/medquad.jsonl"),
        "https://github.com/abachaa/MedQuAD (question-answer pairs as JSONL with question, answer)",
    ),
    "meqsum": Source(
        "mm_meqsum", ("meqsum/meqsum.jsonl",),
        "https://github.com/abachaa/MeQSum (MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx, as JSONL with chq, summary)",
    ),
    "pubmedqa": Source(
        "mm_pubmedqa", ("pubmedqa/ori_pqal.json",), "https://github.com/pubmedqa/pubmedqa/tree/master/data",
    ),
    "pubmedqa_test_ids": Source(
        "mm_pubmedqa", ("pubmedqa/test_ground_truth.json",), "https://github.com/pubmedqa/pubmedqa/tree/master/data",
    ),
    "medqa": Source(
        "mm_medqa", ("medqa/test.jsonl", "medqa/test_hard.jsonl", "medqa/sampled_50.jsonl"),
        "https://github.com/gersteinlab/medagents-benchmark (data/medqa), from https://github.com/jind11/MedQA",
    ),
    "medmcqa": Source(
        "mm_medmcqa", ("medmcqa/test.jsonl", "medmcqa/test_hard.jsonl", "medmcqa/sampled_50.jsonl"),
        "https://github.com/gersteinlab/medagents-benchmark (data/medmcqa), from https://github.com/medmcqa/medmcqa",
    ),
    "mmlu": Source(
        "mm_mmlu_medical", ("mmlu/test",), "https://people.eecs.berkeley.edu/~hendrycks/data.tar (data/test/*_test.csv)",
    ),
}

MMLU_MEDICAL = (
    "anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics", "professional_medicine",
)


def data_root(data_dir: Optional[str | Path] = None) -> Path:
    root = data_dir or os.environ.get("MEDMERGE_DATA")
    if not root:
        raise DataError("no evaluation data directory: pass --data-dir DIR or set MEDMERGE_DATA=DIR")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"the evaluation data directory {root} does not exist (from --data-dir or MEDMERGE_DATA)")
    return root


def locate(key: str, data_dir: Optional[str | Path] = None, override: Optional[str] = None) -> Path:
    """The file for data set `key`; a missing one names every place looked and the public copy."""
    src = SOURCES[key]
    root = data_root(data_dir)
    candidates = [override] if override else list(src.candidates)
    for rel in candidates:
        path = (root / rel).expanduser()
        if path.exists():
            return path
    looked = ", ".join(str(root / c) for c in candidates)
    raise DataError(f"{src.task} needs {looked}, which does not exist; put a copy there (public copy: {src.public})")


def row_locations(path: Path) -> list[str]:
    """Where each record of a data file starts, as read_table counts records ("line N"; "item N" in a JSON list)."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".csv", ".tsv"):
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            out, end, header = [], 0, True
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # csv.DictReader skips blank rows
                    continue
                if header:
                    header = False
                    continue
                out.append(f"line {start}")
            return out
        if suffix in (".jsonl", ".ndjson"):
            return [f"line {n}" for n, line in enumerate(f, start=1) if line.strip()]
    return [f"item {i + 1}" for i in range(len(read_table(path)))]


def require_references(rows: list[dict], column: str, path: Path) -> None:
    """A generation's reference must not be empty: scored against an empty reference, any output counts as 0."""
    empty = [i for i, r in enumerate(rows) if not str(r[column]).strip()]
    if empty:
        where = row_locations(path)
        at = [where[i] if i < len(where) else f"record {i + 1}" for i in empty]
        raise DataError(f"{path}, {at[0]}: the reference {column!r} is empty ({len(empty)} of {len(rows)} rows: "
                        f"{', '.join(at[:5])}{', ...' if len(at) > 5 else ''}); a generation scored against an empty "
                        "reference counts as 0: fill it in or drop the row (the public copy has none)")


# --- one loader per shipped data set: each returns a list of documents -----------------------


def load_ifeval(data_dir=None, file: Optional[str] = None) -> list[dict]:
    path = locate("ifeval", data_dir, file)
    rows = read_jsonl(path)
    require_columns(rows, ("key", "prompt", "instruction_id_list", "kwargs"), path)
    for i, row in enumerate(rows):
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise DataError(f"{path}, line {i + 1}: instruction_id_list must be a list of instruction ids")
        if not isinstance(kwargs, list) or not all(isinstance(x, dict) for x in kwargs):
            raise DataError(f"{path}, line {i + 1}: kwargs must be a list of objects, one per instruction")
        if len(row["kwargs"]) != len(row["instruction_id_list"]):
            raise DataError(f"{path}, line {i + 1}: kwargs and instruction_id_list differ in length")
    return rows


# MTS-Dialog's section codes, spelled out for the prompt (Ben Abacha et al., 2023, table 1).
MTS_SECTIONS = {
    "FAM/SOCHX": "family and social history", "GENHX": "history of present illness", "PASTMEDICALHX": "past medical history",
    "CC": "chief complaint", "PASTSURGICAL": "past surgical history", "ALLERGY": "allergies", "ROS": "review of systems",
    "MEDICATIONS": "medications", "ASSESSMENT": "assessment", "EXAM": "physical examination", "DIAGNOSIS": "diagnosis",
    "DISPOSITION": "disposition", "PLAN": "plan", "EDCOURSE": "emergency department course",
    "IMMUNIZATIONS": "immunizations", "IMAGING": "imaging", "GYNHX": "gynecologic history", "PROCEDURES": "procedures",
    "OTHER_HISTORY": "other history", "LABS": "laboratory results",
}


def load_mts_dialog(data_dir=None, file: Optional[str] = None) -> list[dict]:
    path = locate("mts_dialog", data_dir, file)
    rows = read_table(path)
    require_columns(rows, ("ID", "section_header", "section_text", "dialogue"), path)
    require_references(rows, "section_text", path)
    for row in rows:
        row["section_name"] = MTS_SECTIONS.get(row["section_header"].upper(), row["section_header"].lower())
    return rows


def load_meqsum(data_dir=None, file: Optional[str] = None) -> list[dict]:
    path = locate("meqsum", data_dir, file)
    rows = read_jsonl(path)
    require_columns(rows, ("chq", "summary"), path)
    require_references(rows, "summary", path)
    return rows


def load_pubmedqa(data_dir=None, file: Optional[str] = None) -> list[dict]:
    """PQA-L's official 500 test questions, in the order of test_ground_truth.json."""
    path = locate("pubmedqa", data_dir, file)
    ids_path = locate("pubmedqa_test_ids", data_dir)
    items, truth = (read_json(p, dict, "a JSON object keyed by id") for p in (path, ids_path))
    docs = []
    for pmid, label in truth.items():
        if pmid not in items:
            raise DataError(f"{ids_path}: test id {pmid} is not in {path}; use the two files of the same PubMedQA release")
        item = items[pmid]
        if not isinstance(item, dict):
            raise DataError(f"{path}, item {pmid}: expected an object with QUESTION, CONTEXTS and final_decision")
        missing = [k for k in ("QUESTION", "CONTEXTS", "final_decision") if k not in item]
        if missing:
            raise DataError(f"{path}, item {pmid}: missing {', '.join(missing)}")
        if not isinstance(item["CONTEXTS"], list) or not all(isinstance(c, str) for c in item["CONTEXTS"]):
            raise DataError(f"{path}, item {pmid}: CONTEXTS must be a list of abstract passages")
        if label not in ("yes", "no", "maybe"):
            raise DataError(f"{ids_path}: the answer of {pmid} is {label!r}, not yes, no or maybe")
        docs.append({
            "pmid": pmid, "QUESTION": item["QUESTION"], "CONTEXTS": list(item["CONTEXTS"]),
            "final_decision": label, "LONG_ANSWER": item.get("LONG_ANSWER", ""),
        })
    return docs


def _load_abcd(key: str, data_dir, file: Optional[str]) -> list[dict]:
    path = locate(key, data_dir, file)
    rows = read_jsonl(path)
    require_columns(rows, ("question", "options", "answer_idx"), path)
    for i, row in enumerate(rows):
        options = row["options"]
        if not isinstance(options, dict) or any(k not in options for k in "ABCD"):
            raise DataError(f"{path}, line {i + 1}: 'options' must map A, B, C and D to option texts")
        if not isinstance(row["answer_idx"], str) or row["answer_idx"] not in "ABCD" or len(row["answer_idx"]) != 1:
            raise DataError(f"{path}, line {i + 1}: answer_idx must be one of A, B, C, D, not {row['answer_idx']!r}")
        row["options"] = {k: options[k] for k in "ABCD"}  # extra options (E) are dropped: the tasks are 4-way
        row["label"] = "ABCD".index(row["answer_idx"])
    return rows


def load_medqa(data_dir=None, file: Optional[str] = None) -> list[dict]:
    return _load_abcd("medqa", data_dir, file)


def load_medmcqa(data_dir=None, file: Optional[str] = None) -> list[dict]:
    return _load_abcd("medmcqa", data_dir, file)


def load_mmlu(subject: str, data_dir=None, split: str = "test") -> list[dict]:
    """One MMLU subject from the original CSV layout: <dir>/mmlu/<split>/<subject>_<split>.csv, no header."""
    folder = locate("mmlu", data_dir).parent / split
    path = folder / f"{subject}_{split}.csv"
    if not path.is_file():
        raise DataError(f"mm_mmlu_{subject} needs {path}, which does not exist (public copy: {SOURCES['mmlu'].public})")
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise DataError(f"{path}, line {lineno}: expected question, 4 options and an answer letter A-D")
            docs.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5].strip()),
                         "subject": subject})
    if not docs:
        raise DataError(f"{path} holds no questions")
    return docs


LOADERS: dict[str, Callable[..., list[dict]]] = {
    "mm_ifeval": load_ifeval,
    "mm_mts_dialog": load_mts_dialog,
    "mm_meqsum": load_meqsum,
    "mm_pubmedqa": load_pubmedqa,
    "mm_medqa": load_medqa,
    "mm_medmcqa": load_medmcqa,
}
