"""The summary scores on one 0-100 scale and the relative ones (formulas: evaluation.compare's docstring)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from ..errors import MedmergeError

ACCURACY_LIKE = ("acc", "acc_norm", "exact_match")


def on_scale(metric: str, value: Optional[float]) -> Optional[float]:
    """0-100 scale: accuracies (0-1) are multiplied by 100; generation metrics already are 0-100."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    base = metric.split(",")[0]
    if base in ACCURACY_LIKE or base.endswith("_acc") or base.startswith(("prompt_level", "inst_level")):
        return value * 100
    return value


def pick(results: dict, spec: str) -> Optional[float]:
    """Score named TASK/METRIC (or TASK/mean) on the 0-100 scale; None if the results lack it."""
    if "/" not in spec:
        raise MedmergeError(f"metric {spec!r}: use TASK/METRIC, e.g. mm_ifeval/prompt_level_strict_acc")
    task, metric = spec.split("/", 1)
    row = results["tasks"].get(task)
    if row is None:
        return None
    if metric == "mean":
        values = [on_scale(m, v) for m, v in row.items() if not m.endswith("acc_norm")]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    return on_scale(metric, row.get(metric))


def default_clinical_parts(all_results: Sequence[dict], if_task: str) -> list[str]:
    shared = set.intersection(*(set(r["tasks"]) for r in all_results)) - {if_task}
    parts = []
    for task in sorted(shared):
        rows = [r["tasks"][task] for r in all_results]
        for metric in ("composite", "acc"):
            if all(row.get(metric) is not None for row in rows):
                parts.append(f"{task}/{metric}")
                break
    return parts


def _mean(values: list[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def summary_scores(results: dict, if_metric: str, clinical_parts: Sequence[str]) -> dict:
    """{if_score, clinical_score} of one results dict (0-100 scale; None where a part is missing)."""
    return {"if_score": pick(results, if_metric),
            "clinical_score": _mean([pick(results, p) for p in clinical_parts]) if clinical_parts else None}


def relative_scores(s: dict, instruct: Optional[dict], clinical: Optional[dict]) -> dict:
    """IF retention and clinical gain kept of summary scores `s` (the formulas above); None where undefined."""
    retention = (100 * s["if_score"] / instruct["if_score"]
                 if instruct and s["if_score"] is not None and instruct["if_score"] else None)
    gain = None
    if instruct and clinical and None not in (s["clinical_score"], instruct["clinical_score"], clinical["clinical_score"]):
        span = clinical["clinical_score"] - instruct["clinical_score"]
        if abs(span) > 1e-9:
            gain = 100 * (s["clinical_score"] - instruct["clinical_score"]) / span
    return {"if_retention_pct": retention, "clinical_gain_kept_pct": gain}
