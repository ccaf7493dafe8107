"""Choosing among scored points: the Pareto front, the best point under a constraint, rank agreement."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both objectives maximised).

    A point is dominated when another is at least as good on both and better on one.
    Points with a missing (None/NaN) objective are never on the front; exact
    duplicates are all kept. Returned in order of the first objective, descending.
    """
    valid = [i for i, (a, b) in enumerate(points) if _ok(a) and _ok(b)]
    front = []
    for i in valid:
        a, b = points[i]
        dominated = any(
            points[j][0] >= a and points[j][1] >= b and (points[j][0] > a or points[j][1] > b)
            for j in valid if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (-points[i][0], -points[i][1], i))


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def best_under_constraint(rows: Sequence[dict], *, if_reference: Optional[float], if_retention_min: Optional[float],
                          maximize: str = "clinical_score") -> Optional[dict]:
    """The row maximising `maximize` among rows whose IF score is >= if_retention_min % of `if_reference`.

    With no constraint every row qualifies. Ties go to the higher IF score, then the earlier row.
    Returns {"index", "threshold", "feasible": n} or None when no row qualifies.
    """
    other = "if_score" if maximize == "clinical_score" else "clinical_score"
    threshold = None
    if if_retention_min is not None:
        if if_reference is None:
            return None
        threshold = if_reference * if_retention_min / 100.0
    feasible = [i for i, r in enumerate(rows) if _ok(r.get(maximize)) and _ok(r.get("if_score"))
                and (threshold is None or r["if_score"] >= threshold - 1e-12)]
    if not feasible:
        return None
    best = max(feasible, key=lambda i: (rows[i][maximize], rows[i].get(other) or 0.0, -i))
    return {"index": best, "threshold": threshold, "feasible": len(feasible)}


def ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (Pearson on average ranks); None when undefined."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b; None when undefined."""
    n = len(x)
    if n != len(y) or n < 2:
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denom == 0 else (concordant - discordant) / denom
