"""Successive halving: every candidate on a cheap share of the documents, the best promoted to larger shares.

The last rung is the full evaluation set. The shares are nested (a cheap rung's documents are in
every later rung), and the summary says how well the cheapest ranking agreed with the full-set one
(Kendall's tau and Spearman's rho over the candidates scored on both).
"""

from __future__ import annotations

import math

from ...runtime import track
from .config import SweepConfig
from .evaluator import SweepEvaluator
from .outputs import SweepLog
from .points import Point
from .scoring import Scorer, reference_point
from .select import kendall_tau, spearman


def successive_halving(cfg: SweepConfig, ev: SweepEvaluator, scorer: Scorer, points: list[Point], refs: dict,
                       log: SweepLog, progress: bool) -> tuple[list[dict], dict]:
    """Score every candidate on a small share of the documents, promote the best to larger shares.

    The last rung is the full evaluation set. Returns the rows (each at the largest rung it reached)
    and the rung history with how well the first (cheapest) ranking agreed with the full-set ranking.
    """
    h = cfg.halving
    alive = list(range(len(points)))
    latest: dict[int, dict] = {}
    cheap: dict[int, float] = {}
    rungs = []
    for r, frac in enumerate(h.rungs):
        sel = ev.selection(**ev.base_selection, fraction=frac)
        rung_refs = {role: scorer.row(ev.score(reference_point(role), sel), "reference") for role in cfg.references}
        scored = {}
        for i in track(alive, f"rung {r + 1}/{len(h.rungs)} ({sel.label})", progress,
                       label=lambda i: points[i].describe()):
            row = scorer.row(ev.score(points[i], sel), "grid")
            row["rung"] = r
            scored[i] = scorer.objective(row, rung_refs)
            row["objective"] = scored[i]
            latest[i] = row
            if r == 0:
                cheap[i] = scored[i]
        ranked = sorted(alive, key=lambda i: (-(scored[i] if scored[i] is not None else -math.inf), i))
        rungs.append({"rung": r, "fraction": frac, "selection": sel.label, "candidates": len(alive),
                      "docs": {t: n for t, n in latest[alive[0]]["n_docs"].items()},
                      "ranking": [points[i].describe() for i in ranked]})
        if r < len(h.rungs) - 1:
            alive = ranked[: max(1, math.ceil(len(alive) * h.keep))]
    final = {i: latest[i] for i in alive}
    full_sel = ev.selection(**ev.base_selection, fraction=1.0)
    if h.check:
        for i in range(len(points)):
            if i not in final:
                row = scorer.row(ev.score(points[i], full_sel), "grid")
                row["rung"] = len(h.rungs) - 1
                row["objective"] = scorer.objective(row, refs)
                row["check_only"] = True
                final[i] = row
    rows = []
    for i in range(len(points)):
        row = final.get(i) or latest[i]
        row["stopped_at_rung"] = None if i in alive else latest[i]["rung"]
        rows.append(row)
        log.add(row)
    full = {i: final[i]["objective"] for i in final if final[i]["objective"] is not None}
    pairs = [i for i in full if cheap.get(i) is not None]
    agreement = {
        "pairs": len(pairs),
        "over": "every candidate (halving.check)" if h.check else "the candidates promoted to the full set",
        "kendall_tau": kendall_tau([cheap[i] for i in pairs], [full[i] for i in pairs]),
        "spearman": spearman([cheap[i] for i in pairs], [full[i] for i in pairs]),
    }
    if pairs:
        cheap_top = max(pairs, key=lambda i: (cheap[i], -i))
        full_top = max(pairs, key=lambda i: (full[i], -i))
        agreement.update(cheap_top=points[cheap_top].describe(), full_top=points[full_top].describe(),
                         top1_agrees=cheap_top == full_top)
    evaluated_docs = sum(r["candidates"] * sum(r["docs"].values()) for r in rungs)
    full_docs = len(points) * sum(ev.doc_count(t) for t in ev.tasks)
    return rows, {"rungs": rungs, "keep": h.keep, "agreement": agreement, "check": h.check,
                  "documents_scored": evaluated_docs, "documents_full_grid": full_docs}
