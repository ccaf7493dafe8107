"""How far fine-tunes moved from their parent, and how aligned their moves are: are two models mergeable?

For a parent P and fine-tunes M_i, the task vector of M_i is tau_i = M_i - P (Ilharco et al., 2023). Two
numbers predict whether interpolation works:

- the **relative norm** ||tau_i|| / ||P|| (Frobenius norm over all tensors of a group). Real fine-tunes
  of a pretrained LLM move the non-embedding weights by about 1% or less, so the models share one
  linear basin; tiny models trained from a short base move by 10-90% and interpolating them can fall
  off a cliff;
- the **cosine** <tau_i, tau_j> / (||tau_i|| ||tau_j||): near 0 for unrelated skills (the deltas
  barely interfere), near 1 when both fine-tunes learned the same thing.

Both are reported separately for the vocabulary-indexed tensors (embeddings, lm_head: they move
with the data's vocabulary) and for everything else. Tensors are streamed one at a time and
accumulated in float64, so an 8B model needs memory for a few tensors only.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Mapping, Optional

from tqdm import tqdm

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from .architecture import vocab_axis

GROUPS = ("non_embedding", "embedding")
REAL_LLM_RELATIVE_NORM = 0.01  # about 1%: the non-embedding delta of a real LLM fine-tune, for comparison


def group_of(name: str) -> str:
    return "embedding" if vocab_axis(name) is not None else "non_embedding"


def task_vectors(parent: str | Path, models: Mapping[str, str | Path], *, progress: bool = False) -> dict:
    """Relative norms of each model's delta from `parent` and the pairwise cosines of the deltas.

    Only floating-point tensors that the parent and every model hold with the same shape count; the
    others are listed under `skipped` (a resized vocabulary, an extra head) with the reason.
    """
    if not models:
        raise InputError("task vectors need at least one model besides the parent")
    p = Checkpoint(Path(parent))
    cks = {name: Checkpoint(Path(path)) for name, path in models.items()}
    names = list(cks)
    parent_sq = dict.fromkeys(GROUPS, 0.0)
    delta_sq = {n: dict.fromkeys(GROUPS, 0.0) for n in names}
    dots = {pair: dict.fromkeys(GROUPS, 0.0) for pair in combinations(names, 2)}
    counted = dict.fromkeys(GROUPS, 0)
    skipped: dict[str, str] = {}
    tensors = sorted(p.records)
    iterator = tqdm(tensors, desc="task vectors", unit="tensor") if progress else tensors
    for tensor in iterator:
        rec = p.records[tensor]
        if not rec.torch_dtype.is_floating_point:
            skipped[tensor] = f"not floating point ({rec.dtype})"
            continue
        missing = [n for n in names if tensor not in cks[n].records]
        if missing:
            skipped[tensor] = f"missing from {', '.join(missing)}"
            continue
        other = [n for n in names if tuple(cks[n].records[tensor].shape) != tuple(rec.shape)]
        if other:
            skipped[tensor] = f"shape differs in {', '.join(other)}"
            continue
        group = group_of(tensor)
        base = p.read(tensor).double()
        parent_sq[group] += float(base.pow(2).sum())
        deltas = {}
        for n in names:
            deltas[n] = cks[n].read(tensor).double() - base
            delta_sq[n][group] += float(deltas[n].pow(2).sum())
        for a, b in dots:
            dots[(a, b)][group] += float((deltas[a] * deltas[b]).sum())
        counted[group] += 1
    if not any(counted.values()):
        raise InputError(f"no tensor of {parent} is in every model with the same shape; these are not fine-tunes "
                         "of it (compare a model with the parent it was trained from)")

    def stats(sq: dict[str, float]) -> dict:
        out = {}
        for g in GROUPS:
            norm, pnorm = math.sqrt(sq[g]), math.sqrt(parent_sq[g])
            out[g] = {"delta_norm": norm, "parent_norm": pnorm,
                      "relative_norm": norm / pnorm if pnorm > 0 else None, "tensors": counted[g]}
        total, ptotal = math.sqrt(sum(sq.values())), math.sqrt(sum(parent_sq.values()))
        out["all"] = {"delta_norm": total, "parent_norm": ptotal,
                      "relative_norm": total / ptotal if ptotal > 0 else None, "tensors": sum(counted.values())}
        return out

    def cosine(dot: float, x: float, y: float) -> Optional[float]:
        return dot / math.sqrt(x * y) if x > 0 and y > 0 else None

    pairs = []
    for (a, b), d in dots.items():
        row = {"a": a, "b": b}
        for g in GROUPS:
            row[g] = cosine(d[g], delta_sq[a][g], delta_sq[b][g])
        row["all"] = cosine(sum(d.values()), sum(delta_sq[a].values()), sum(delta_sq[b].values()))
        pairs.append(row)
    return {"parent": str(parent), "models": {n: {"path": str(models[n]), **stats(delta_sq[n])} for n in names},
            "cosines": pairs, "skipped": skipped, "real_llm_relative_norm": REAL_LLM_RELATIVE_NORM}


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def fmt_cos(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_markdown(report: dict) -> str:
    """The norms and cosines as markdown tables, with the real-LLM figure for scale."""
    lines = [f"Task vectors from `{report['parent']}` (relative Frobenius norm of model - parent; a real LLM "
             f"fine-tune moves its non-embedding weights by about {fmt_pct(report['real_llm_relative_norm'])}).", "",
             "| model | non-embedding delta | embedding delta | all |", "|---|---|---|---|"]
    for name, s in report["models"].items():
        lines.append(f"| {name} | {fmt_pct(s['non_embedding']['relative_norm'])} | "
                     f"{fmt_pct(s['embedding']['relative_norm'])} | {fmt_pct(s['all']['relative_norm'])} |")
    if report["cosines"]:
        lines += ["", "| task vectors | cosine (non-embedding) | cosine (embedding) | cosine (all) |",
                  "|---|---|---|---|"]
        for c in report["cosines"]:
            lines.append(f"| {c['a']} · {c['b']} | {fmt_cos(c['non_embedding'])} | {fmt_cos(c['embedding'])} | "
                         f"{fmt_cos(c['all'])} |")
    if report["skipped"]:
        lines += ["", f"{len(report['skipped'])} tensor(s) not compared (e.g. "
                  + "; ".join(f"{k}: {v}" for k, v in list(report["skipped"].items())[:3]) + ")."]
    return "\n".join(lines)
