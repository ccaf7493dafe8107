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

and becomes an lm-eval task config with the same metrics as mm_mts_dialog.
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
OPTIONAL = ("metrics", "max_new_tokens", "stop")


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

    def docs(self) -> list[dict]:
        rows = data.read_table(self.data)
        data.require_columns(rows, (self.input, self.target), self.data)
        return rows

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


def load_task_file(path: str | Path) -> TaskFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"task file {path}: not valid YAML ({e})")
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
    try:
        metrics.expand(groups)
    except ValueError as e:
        raise DataError(f"task file {path}: {e}")
    if not groups:
        raise DataError(f"task file {path}: metrics is empty; choose any of rouge, bleu, meteor")
    max_new = spec.get("max_new_tokens", 256)
    if not isinstance(max_new, int) or max_new < 1:
        raise DataError(f"task file {path}: max_new_tokens must be a positive integer, not {max_new!r}")
    stop = spec.get("stop", ["\n\n"])
    if isinstance(stop, str):
        stop = [stop]
    data_path = Path(os.path.expandvars(str(spec["data"]))).expanduser()
    if not data_path.is_absolute():
        data_path = path.parent / data_path
    if not data_path.is_file():
        raise DataError(f"task file {path}: data file {data_path} does not exist")
    task = TaskFile(
        name=name, data=data_path, input=str(spec["input"]), target=str(spec["target"]), prompt=str(spec["prompt"]),
        metrics=tuple(dict.fromkeys(groups)), max_new_tokens=max_new, stop=list(stop), source=path,
    )
    task.docs()  # check the file and its columns now, before any model is loaded
    return task
