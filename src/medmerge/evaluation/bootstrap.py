"""Paired bootstrap intervals over evaluation documents, for the summary scores and what they compare.

A model's summary scores (instruction following, the clinical composite, docs/evaluation.md) are
means over documents, so their sampling error is the documents'. `bootstrap` resamples the documents
of every task with replacement (independently per task: a stratified bootstrap, since each task's
mean enters the composite on its own) and applies the SAME resampled documents to every model, so
differences between models, ratios such as IF retention, and the clinical gain kept are paired: a
document that is hard for one model is hard for the other in the same replicate. The interval is
the percentile interval of the replicates (Efron and Tibshirani, 1993, ch. 13).

Per-document values come from lm-eval's logged samples (`per_doc` in results.json, written with
`--log-samples`; `per_doc_scores`). A metric qualifies only when the mean of its per-document
values reproduces the task's reported value: corpus-level metrics (BLEU, METEOR over the corpus)
and list-valued ones (IFEval's instruction-level accuracy) do not, and have no interval here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError
from .hooks import sample_value
from .scores import relative_scores, summary_scores

DEFAULT_REPLICATES = 2000
CONFIDENCE = 0.95
MEAN_TOLERANCE = 1e-6  # |mean of per-doc values - reported value| above which a metric is not a per-doc mean

# {task: {"doc_ids": [...], metric: [value per doc, ...]}}: one model's per-document scores
PerDoc = Mapping[str, Mapping[str, list]]


def per_doc_scores(samples: Mapping[str, Sequence[dict]], tasks: Mapping[str, Mapping[str, float]]) -> dict:
    """lm-eval's logged samples -> {task: {"doc_ids": [...], metric: [float, ...]}}, keeping only the metrics whose
    per-document mean reproduces the task's reported value (`tasks`, results.json's "tasks" block)."""
    out: dict[str, dict] = {}
    for task, rows in samples.items():
        reported = tasks.get(task, {})
        by_filter: dict[str, list[dict]] = {}
        for s in rows:
            by_filter.setdefault(s.get("filter") or "none", []).append(s)
        entry: dict[str, list] = {}
        for filt, group in by_filter.items():
            group = sorted(group, key=lambda s: s.get("doc_id", 0))
            ids = [int(s.get("doc_id", i)) for i, s in enumerate(group)]
            if entry.setdefault("doc_ids", ids) != ids:
                continue  # a filter that saw other documents: not paired with the rest
            for metric in group[0].get("metrics", []):
                values = [sample_value(metric, s.get(metric)) for s in group]
                if not all(isinstance(v, (int, float)) for v in values):  # lists (instruction-level), strings, None
                    continue
                values = [float(v) for v in values]
                name = metric if filt == "none" else f"{metric},{filt}"
                if _is_mean(values, reported.get(name)):
                    entry[name] = values
        if len(entry) > 1:
            out[task] = entry
    return out


def _is_mean(values: list[float], reported) -> bool:
    if reported is None or not isinstance(reported, (int, float)) or math.isnan(float(reported)) or not values:
        return False
    mean = sum(values) / len(values)
    return abs(mean - float(reported)) <= MEAN_TOLERANCE * max(1.0, abs(float(reported)))


@dataclass(frozen=True)
class Interval:
    """A statistic's value on the full documents and its percentile bootstrap interval."""

    value: Optional[float]
    low: Optional[float]
    high: Optional[float]
    replicates: int  # replicates in which the statistic was defined
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "confidence": self.confidence,
                "replicates": self.replicates}


class Bootstrap:
    """Paired, per-task stratified resampling of the documents the given models share.

    `models` maps a name to its PerDoc; every model must hold the same documents of each task it is
    used with (the same doc ids), which is checked. `tasks` limits the resampling to the named tasks.
    """

    def __init__(self, models: Mapping[str, PerDoc], tasks: Sequence[str], *, replicates: int = DEFAULT_REPLICATES,
                 seed: int = 0, confidence: float = CONFIDENCE):
        if replicates < 1:
            raise ValueError("replicates must be at least 1")
        if not 0 < confidence < 1:
            raise ValueError("confidence must lie strictly between 0 and 1")
        self.names = list(models)
        self.tasks = list(dict.fromkeys(tasks))
        self.replicates, self.confidence = replicates, confidence
        rng = np.random.default_rng(seed)
        self._means: dict[str, dict[str, dict[str, np.ndarray]]] = {n: {} for n in self.names}
        self._full: dict[str, dict[str, dict[str, float]]] = {n: {} for n in self.names}
        for task in self.tasks:
            have = [n for n in self.names if task in models[n]]
            if not have:
                continue
            ids = models[have[0]][task]["doc_ids"]
            for n in have[1:]:
                if list(models[n][task]["doc_ids"]) != list(ids):
                    raise InputError(f"paired bootstrap: {n} and {have[0]} were scored on different documents of "
                                     f"{task}; evaluate them with the same limit or samples")
            idx = rng.integers(0, len(ids), size=(replicates, len(ids)))  # one draw per task, shared by all models
            for n in have:
                for metric, values in models[n][task].items():
                    if metric == "doc_ids":
                        continue
                    v = np.asarray(values, dtype=np.float64)
                    self._means[n].setdefault(task, {})[metric] = v[idx].mean(axis=1)
                    self._full[n].setdefault(task, {})[metric] = float(v.mean())

    def covers(self, name: str, specs: Sequence[str]) -> bool:
        """Whether `name` has per-document values for every TASK/METRIC in `specs`."""
        for spec in specs:
            task, metric = spec.split("/", 1)
            if metric not in self._means.get(name, {}).get(task, {}):
                return False
        return True

    def _results(self, name: str, b: Optional[int]) -> dict:
        src = self._full[name] if b is None else self._means[name]
        return {"tasks": {t: {m: (v if b is None else float(v[b])) for m, v in row.items()} for t, row in src.items()}}

    def interval(self, statistic: Callable[[Callable[[str], dict]], Optional[float]]) -> Interval:
        """`statistic(results_of)` -> a number or None, where `results_of(name)` is a results dict ({"tasks": ...})
        of that model on the full documents (the point value) or on one replicate's documents."""
        value = statistic(lambda n: self._results(n, None))
        if value is None:
            return Interval(None, None, None, 0, self.confidence)
        reps = []
        for b in range(self.replicates):
            v = statistic(lambda n, b=b: self._results(n, b))
            if v is not None and not math.isnan(v):
                reps.append(v)
        if not reps:
            return Interval(value, None, None, 0, self.confidence)
        alpha = (1 - self.confidence) / 2
        low, high = np.quantile(np.asarray(reps), [alpha, 1 - alpha])
        return Interval(value, float(low), float(high), len(reps), self.confidence)


def tasks_of(specs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(s.split("/", 1)[0] for s in specs))


def score_intervals(boot: Bootstrap, name: str, if_metric: str, clinical_parts: Sequence[str]) -> dict:
    """Intervals of `name`'s IF score and clinical composite (0-100); None where a part has no per-doc values."""
    out = {}
    for key, specs in (("if_score", [if_metric]), ("clinical_score", list(clinical_parts))):
        out[key] = boot.interval(lambda r, key=key: summary_scores(r(name), if_metric, clinical_parts)[key]).as_dict() \
            if boot.covers(name, specs) else None
    return out


def difference_interval(boot: Bootstrap, a: str, b: str, key: str, if_metric: str,
                        clinical_parts: Sequence[str]) -> Optional[Interval]:
    """Paired interval of score(a) - score(b), `key` = if_score or clinical_score."""
    specs = [if_metric] if key == "if_score" else list(clinical_parts)
    if not (boot.covers(a, specs) and boot.covers(b, specs)):
        return None

    def stat(r):
        x, y = (summary_scores(r(n), if_metric, clinical_parts)[key] for n in (a, b))
        return None if x is None or y is None else x - y

    return boot.interval(stat)


def relative_intervals(boot: Bootstrap, name: str, instruct: str, clinical: Optional[str], if_metric: str,
                       clinical_parts: Sequence[str]) -> dict:
    """Paired intervals of `name`'s IF retention (vs `instruct`) and clinical gain kept (vs `instruct` -> `clinical`),
    in percent; None where the models lack per-document values."""
    def rel(r, key):
        s = summary_scores(r(name), if_metric, clinical_parts)
        i = summary_scores(r(instruct), if_metric, clinical_parts)
        c = summary_scores(r(clinical), if_metric, clinical_parts) if clinical else None
        return relative_scores(s, i, c)[key]

    out = {"if_retention_pct": None, "clinical_gain_kept_pct": None}
    if boot.covers(name, [if_metric]) and boot.covers(instruct, [if_metric]):
        out["if_retention_pct"] = boot.interval(lambda r: rel(r, "if_retention_pct")).as_dict()
    if clinical and all(boot.covers(n, clinical_parts) for n in (name, instruct, clinical)):
        out["clinical_gain_kept_pct"] = boot.interval(lambda r: rel(r, "clinical_gain_kept_pct")).as_dict()
    return out


def verdict(diff: Optional[Interval], tolerance: float) -> str:
    """The claim "a matches b within `tolerance` points" from the paired interval of a - b."""
    if diff is None or diff.value is None or diff.low is None:
        return "cannot tell (no per-document scores)"
    if diff.low >= -tolerance:
        return "holds"
    if diff.high < -tolerance:
        return "does not hold"
    return "cannot tell at this sample size"


def retention_intervals(point: Optional[PerDoc], instruct: Optional[PerDoc], clinical: Optional[PerDoc], if_metric: str,
                        clinical_parts: Sequence[str], *, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict:
    """{if_retention_ci, clinical_gain_kept_ci} of a model against the instruct (and clinical) references from their
    per-document values; None where a model lacks them or was scored on other documents than the references."""
    models = {"point": point or {}, "instruct": instruct or {}}
    if clinical is not None:
        models["clinical"] = clinical
    none = {"if_retention_ci": None, "clinical_gain_kept_ci": None}
    try:
        boot = Bootstrap(models, tasks_of([if_metric, *clinical_parts]), replicates=replicates, seed=seed)
    except InputError:
        return none
    ci = relative_intervals(boot, "point", "instruct", "clinical" if clinical is not None else None, if_metric,
                            list(clinical_parts))
    return {"if_retention_ci": ci["if_retention_pct"], "clinical_gain_kept_ci": ci["clinical_gain_kept_pct"]}
