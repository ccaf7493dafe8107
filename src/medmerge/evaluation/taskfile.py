"""The generic clinical-generation task: any CSV/JSONL with an input and a target column.

A task file (`--task-file SPEC.yaml`) looks like

    name: radiology_impression
    data: reports.jsonl            # .csv, .tsv, .jsonl or .json; relative to this file; $VARS expand
    input: findings                # column given to the prompt
    target: impression             # reference column
    prompt: "Findings: {input}\\nImpression:"
    metrics: [rouge, bleu, meteor] # any of these; default all three
    max_new_tokens: 128
    stop: ["\\n\\n"]                # optional, default ["\\n\\n"]
    skip_empty_targets: false      # optional: true skips rows whose target is empty or missing

and becomes an lm-eval task config with the same metrics as mm_mts_dialog. A row whose target
is empty or missing is an error naming the data file and its line (a generation scored against
an empty reference is silently 0); with `skip_empty_targets: true` such rows are left out, and
results.json records how many and which (`skipped`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import data, hooks, metrics
from .data import DataError

REQUIRED = ("name", "data", "input", "target", "prompt")
OPTIONAL = ("metrics", "max_new_tokens", "stop", "skip_empty_targets")


@dataclass
class TaskFile:
    name: str
    data: Path
    input: str
    target: str
    prompt: str
    metrics: tuple[str, ...] = metrics.DEFAULT_METRICS
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    source: Path | None = None
    skip_empty_targets: bool = False
    skipped: list[str] = field(default_factory=list)  # where the rows left out by skip_empty_targets are

    def docs(self) -> list[dict]:
        """The data rows; a row with an empty or missing target is an error, or left out with skip_empty_targets."""
        rows = data.read_table(self.data)  # a file that is not UTF-8 is a DataError naming its line
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise DataError(f"{self.data}, item {i + 1}: expected a JSON object with {self.input!r} and "
                                f"{self.target!r}, got {type(r).__name__}")
        if all(r.get(self.target) is None for r in rows):
            data.require_columns(rows, (self.input, self.target), self.data)  # no such column: name those found
        data.require_columns(rows, (self.input,), self.data)
        empty = [i for i, r in enumerate(rows) if r.get(self.target) is None or not str(r[self.target]).strip()]
        where = data.row_locations(self.data) if empty else []
        self.skipped = [where[i] if i < len(where) else f"record {i + 1}" for i in empty]
        if empty and not self.skip_empty_targets:
            first = rows[empty[0]]
            state = "missing" if first.get(self.target) is None else "empty"
            raise DataError(
                f"{self.data}, {self.skipped[0]}: the target {self.target!r} is {state} ({len(empty)} of {len(rows)} "
                f"rows have no target: {', '.join(self.skipped[:5])}{', ...' if len(empty) > 5 else ''}); a "
                "generation scored against an empty reference counts as 0. Fill the targets in or drop those rows, "
                f"or add `skip_empty_targets: true` to the task file {self.source or ''} to leave them out (the count "
                "is recorded in results.json)")
        if len(empty) == len(rows):
            raise DataError(f"{self.data}: every row's target {self.target!r} is empty, so nothing is left to "
                            "evaluate; check the target column")
        skip = set(empty)
        return [r for i, r in enumerate(rows) if i not in skip]

    def render(self, doc: dict) -> str:
        return self.prompt.replace("{input}", str(doc[self.input]))

    def lm_eval_config(self) -> dict:
        """An inline lm-eval task config (callables instead of `!function`)."""
        metric_list = [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in metrics.expand(self.metrics) if m != "bleu"
        ]
        if "bleu" in self.metrics:
            metric_list.append({"metric": "bleu", "aggregation": hooks.agg_bleu, "higher_is_better": True})
        metric_list.append({"metric": "composite", "aggregation": hooks.agg_composite, "higher_is_better": True})
        return {
            "task": self.name,
            "custom_dataset": functools.partial(_dataset, self),
            "output_type": "generate_until",
            "test_split": "test",
            "num_fewshot": 0,
            "doc_to_text": self.render,
            "doc_to_target": self.target,
            "process_results": functools.partial(hooks.generation_results, target=self.target, groups=self.metrics),
            "generation_kwargs": {"until": list(self.stop), "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": self.max_new_tokens},
            "metric_list": metric_list,
            "metadata": {"version": 1.0, "task_file": str(self.source) if self.source else None},
        }


def _dataset(task: TaskFile, **_):
    return hooks.as_dataset(task.docs())


def yaml_problem(e: yaml.YAMLError) -> str:
    """', line N: not valid YAML (what)' on one line, from PyYAML's multi-line message."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    return f"{f', line {mark.line + 1}' if mark is not None else ''}: not valid YAML ({what})"


def load_task_file(path: str | Path) -> TaskFile:
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"task file {path} is a folder; pass the task's SPEC.yaml (keys {', '.join(REQUIRED)})")
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"task file {path}: not UTF-8 text; a task file is YAML (keys {', '.join(REQUIRED)})") from None
    except yaml.YAMLError as e:
        raise DataError(f"task file {path}{yaml_problem(e)}") from None
    if not isinstance(spec, dict):
        raise DataError(f"task file {path}: expected a mapping with keys {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise DataError(f"task file {path}: missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(spec) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataError(f"task file {path}: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(REQUIRED + OPTIONAL)}")
    name = str(spec["name"])
    if not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"task file {path}: name {name!r} must be letters, digits, '_' or '-'")
    if "{input}" not in str(spec["prompt"]):
        raise DataError(f"task file {path}: prompt must contain '{{input}}' where the {spec['input']!r} column goes")
    groups = spec.get("metrics", list(metrics.DEFAULT_METRICS))
    if isinstance(groups, str):
        groups = [g.strip() for g in groups.split(",")]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise DataError(f"task file {path}: metrics must be a list such as [rouge, bleu, meteor], not {groups!r}")
    try:
        metrics.expand(groups)
    except ValueError as e:
        raise DataError(f"task file {path}: {e}")
    if not groups:
        raise DataError(f"task file {path}: metrics is empty; choose any of rouge, bleu, meteor")
    max_new = spec.get("max_new_tokens", 256)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise DataError(f"task file {path}: max_new_tokens must be a positive integer, not {max_new!r}")
    stop = spec.get("stop", ["\n\n"])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise DataError(f"task file {path}: stop must be a string or a list of strings, not {stop!r}")
    if not all(stop):
        raise DataError(f"task file {path}: stop holds an empty string ({stop!r}), which matches at once and cuts "
                        "every generation short; remove it, or leave `stop` out for the default ['\\n\\n']")
    skip_empty = spec.get("skip_empty_targets", False)
    if not isinstance(skip_empty, bool):
        raise DataError(f"task file {path}: skip_empty_targets must be true or false, not {skip_empty!r}")
    data_path = Path(os.path.expandvars(str(spec["data"]))).expanduser()
    if not data_path.is_absolute():
        data_path = path.parent / data_path
    if data_path.is_dir():
        raise DataError(f"task file {path}: data {data_path} is a folder; name the data file (.csv, .tsv, .jsonl, .json)")
    if not data_path.is_file():
        raise DataError(f"task file {path}: data file {data_path} does not exist")
    task = TaskFile(
        name=name, data=data_path, input=str(spec["input"]), target=str(spec["target"]), prompt=str(spec["prompt"]),
        metrics=tuple(dict.fromkeys(groups)), max_new_tokens=max_new, stop=list(stop), source=path,
        skip_empty_targets=skip_empty,
    )
    task.docs()  # check the file and its columns now, before any model is loaded
    return task
