"""A sweep point's two summary scores (0-100, as `medmerge compare`), its retention, and its halving objective."""

from __future__ import annotations

from typing import Optional, Sequence

from ...errors import ConfigError
from ...evaluation.bootstrap import retention_intervals
from ...evaluation.scores import default_clinical_parts, relative_scores, summary_scores
from .config import SweepConfig
from .evaluator import Scored, SweepEvaluator
from .points import Point, Roles


SWEEP_REPLICATES = 1000  # per point: two intervals, paired with the references


def reference_point(role: str) -> Point:
    return Point(method="reference", label=role,
                 config={"merge_method": "linear", "models": [{"model": role, "parameters": {"weight": 1.0}}]})


class Scorer:
    """Turns evaluator results into rows with the two summary scores (0-100 scale, as `medmerge compare`)."""

    def __init__(self, cfg: SweepConfig, ev: SweepEvaluator):
        self.cfg, self.ev = cfg, ev
        self.if_metric = cfg.scores.if_metric
        if_task = self.if_metric.split("/", 1)[0]
        if if_task not in ev.tasks:
            raise ConfigError(f"scores.if_metric {self.if_metric}: task {if_task} is not in eval.tasks {ev.tasks}")
        self.clinical_parts = list(cfg.scores.clinical_metrics)
        for part in self.clinical_parts:
            if part.split("/", 1)[0] not in ev.tasks:
                raise ConfigError(f"scores.clinical_metrics {part}: its task is not in eval.tasks {ev.tasks}")

    def row(self, s: Scored, kind: str) -> dict:
        results = {"tasks": s.tasks}
        if not self.clinical_parts:
            self.clinical_parts = default_clinical_parts([results], self.if_metric.split("/", 1)[0])
        p = s.point
        return {
            "id": s.key, "label": p.describe(), "kind": kind, "method": p.method, "params": p.params,
            "config": s.config, "selection": s.selection, "n_docs": s.n_docs, "tasks": s.tasks, "per_doc": s.per_doc,
            **summary_scores(results, self.if_metric, self.clinical_parts),
            "cached": s.cached, "seconds": s.seconds,
        }

    def objective(self, row: dict, refs: dict[str, dict]) -> Optional[float]:
        """One number to rank candidates by (successive halving): the selection rule as a scalar.

        With an IF constraint, a point meeting it scores its maximised score (0-100); one missing it
        scores -100 + 100 * IF / threshold (so every feasible point ranks above every infeasible one).
        """
        i, c = row.get("if_score"), row.get("clinical_score")
        if i is None or c is None:
            return None
        sel = self.cfg.select
        target = c if sel.maximize == "clinical" else i
        ref = refs.get(self.cfg.roles.general, {}).get("if_score")
        if sel.if_retention_min is None or not ref:
            return target if sel.maximize == "if" or sel.if_retention_min is not None else (i + c) / 2
        threshold = ref * sel.if_retention_min / 100
        return target if i >= threshold - 1e-12 else -100 + 100 * i / threshold


def add_relative(rows: list[dict], refs: dict[str, dict], roles: Roles, if_metric: Optional[str] = None,
                 clinical_parts: Sequence[str] = (), seed: int = 0, replicates: int = SWEEP_REPLICATES) -> None:
    """IF retention and clinical gain kept (compare's formulas) relative to the general and domain references,
    and, given the metrics, their paired bootstrap intervals over the documents (`*_ci`: {value, low, high});
    a row scored on other documents than the references (a halving rung) or without per-document values has
    None there."""
    general, domain = refs.get(roles.general), refs.get(roles.domain)
    for r in rows:
        r.update(relative_scores(r, general, domain))
        r["if_retention_ci"] = r["clinical_gain_kept_ci"] = None
        if if_metric is None or general is None or r.get("kind") == "reference":
            continue
        r.update(retention_intervals(r.get("per_doc"), general.get("per_doc"),
                                     domain.get("per_doc") if domain is not None else None, if_metric,
                                     clinical_parts, replicates=replicates, seed=seed))
