"""`results.json` and `samples/<task>.jsonl`: lm-eval's raw output in medmerge's documented schema.

lm-eval's metric keys (`acc,none`, `acc_stderr,none`) become plain names with their
standard errors beside them; metrics a task declares but could not compute here are
listed with the reason instead of being reported as 0; logged samples become
{doc, prompt, response, metrics} records. Schema: docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ..io.paths import safe_name, under
from ..io.writer import atomic_output_dir
from . import hooks, metrics

SCHEMA = "medmerge.eval/1"


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def convert_results(raw: dict) -> dict[str, dict]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys -> {task: {metric: value}} and {task: {metric: stderr}}."""
    scores: dict[str, dict] = {}
    stderr: dict[str, dict] = {}
    for task, row in raw.get("results", {}).items():
        for key, value in row.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            if name.endswith("_stderr") or "_stderr," in name:
                if isinstance(value, (int, float)):
                    stderr.setdefault(task, {})[name.replace("_stderr", "")] = _plain(value)
                continue
            if isinstance(value, (int, float)):
                scores.setdefault(task, {})[name] = _plain(value)
    return {"tasks": scores, "stderr": stderr}


def unavailable_metrics(raw: dict) -> dict[str, dict[str, str]]:
    """Metrics a task declares but could not compute here, with the reason (METEOR without WordNet)."""
    out: dict[str, dict[str, str]] = {}
    for task, cfg in raw.get("configs", {}).items():
        declared = [m.get("metric") for m in cfg.get("metric_list", []) or []]
        if "meteor" not in declared:
            continue
        status = metrics.meteor_status()
        have = raw.get("results", {}).get(task, {})
        for m in ("meteor", "composite"):
            if m in declared and f"{m},none" not in have and not status.available:
                reason = status.reason if m == "meteor" else "METEOR, one of its parts, is unavailable: " + status.reason
                out.setdefault(task, {})[m] = reason
    return out


def jsonable(obj):
    """`obj` with every value JSON can hold kept, NaN as null, and anything else as its text."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def sample_records(task_samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples -> {doc, prompt, response, metrics} records."""
    out = []
    for s in task_samples:
        args = s.get("arguments") or []
        prompt = args[0][0] if args and isinstance(args[0], (list, tuple)) else None
        resps = s.get("filtered_resps") or []
        record: dict[str, Any] = {"doc_id": s.get("doc_id"), "doc": s.get("doc"), "prompt": prompt}
        if args and len(args) > 1 or (resps and isinstance(resps[0], (list, tuple))):
            # multiple choice: one (log-likelihood, is_greedy) per option
            lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
            options = [a[1] for a in args]
            best = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
            record["response"] = options[best] if best is not None else None
            record["option_loglikelihoods"] = dict(zip(options, lls))
            record["target"] = s.get("target")
        else:
            record["response"] = resps[0] if resps else None
            record["target"] = s.get("target")
        record["metrics"] = {m: hooks.sample_value(m, s.get(m)) for m in s.get("metrics", [])}
        out.append(jsonable(record))
    return out


def write_results(out: Path, results: dict, samples: Optional[dict], force: bool) -> None:
    """OUT/results.json (+ OUT/samples/<task>.jsonl), written into a temporary folder and moved into place."""
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        if samples is not None:
            (tmp / "samples").mkdir()
            for task, rows in samples.items():
                with open(under(tmp / "samples", f"{safe_name(task, 'task name')}.jsonl", what="task samples"), "w",
                          encoding="utf-8") as f:
                    for record in sample_records(rows):
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
