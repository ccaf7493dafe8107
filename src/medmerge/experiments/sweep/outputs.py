"""What a sweep writes: sweep.jsonl (as points are scored, then final), sweep_summary.json, sweep.md, the plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...evaluation.compare import fmt_score as _f
from ...evaluation.compare import fmt_with_ci
from ...evaluation.runner import RECORDED_LIBRARIES
from ...merging.deltas import render_markdown as render_task_vectors
from ...merging.deltas import task_vectors
from ...runtime import library_versions
from ..plots import plot_pareto, plot_vs_t
from .config import SweepConfig
from .select import best_under_constraint, pareto_front

SCHEMA = "medmerge.sweep/1"


class SweepLog:
    """sweep.jsonl, written as points are scored (so a long sweep can be watched) and rewritten at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.path.write_text("")

    def add(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")


def summarize(cfg, info, ev, scorer, rows, refs, halving, search_info, started) -> dict:
    """sweep_summary.json: the references, the Pareto front, the best point under the rule, counts, versions."""
    full_rows = [r for r in rows if r.get("stopped_at_rung") is None]
    pts = [(r["if_score"], r["clinical_score"]) for r in full_rows]
    front = [full_rows[i]["id"] for i in pareto_front(pts)]
    for r in rows:
        r["pareto"] = r["id"] in front and r.get("stopped_at_rung") is None
    merges = [r for r in full_rows if r["kind"] != "reference"]
    gen_ref = refs.get(ev.roles.general, {}).get("if_score")
    maximize = "clinical_score" if cfg.select.maximize == "clinical" else "if_score"
    choice = best_under_constraint(merges, if_reference=gen_ref, if_retention_min=cfg.select.if_retention_min,
                                   maximize=maximize)
    best = None
    if choice is not None:
        b = merges[choice["index"]]
        best = {"id": b["id"], "label": b["label"], "method": b["method"], "params": b["params"],
                "config": b["config"], "if_score": b["if_score"], "clinical_score": b["clinical_score"],
                "if_retention_pct": b.get("if_retention_pct"), "clinical_gain_kept_pct": b.get("clinical_gain_kept_pct"),
                "if_retention_ci": b.get("if_retention_ci"), "clinical_gain_kept_ci": b.get("clinical_gain_kept_ci"),
                "threshold": choice["threshold"], "feasible": choice["feasible"]}
    return {
        "schema": SCHEMA, "config_file": info["config_file"], "world": info["world"],
        "models": {r: str(p) for r, p in cfg.models.items()}, "fingerprints": ev.fingerprints,
        "roles": cfg.roles.model_dump(), "tasks": ev.tasks, "selection": ev.selection(**ev.base_selection).label,
        "if_metric": scorer.if_metric, "clinical_metrics": scorer.clinical_parts, "scale": "0-100 (accuracies x 100)",
        "references": {k: {"if_score": v["if_score"], "clinical_score": v["clinical_score"], "tasks": v["tasks"]}
                       for k, v in refs.items()},
        "points": len(rows) - len(refs), "pareto": front,
        "select": {**cfg.select.model_dump(), "if_reference": gen_ref,
                   "rule": _rule_text(cfg, gen_ref)},
        "best": best, "halving": halving, "search": search_info, "task_vectors": _task_vectors(cfg),
        "evaluations": {"run": ev.stats.evaluated, "cached": ev.stats.cached, "merges": ev.stats.merges,
                        "merge_seconds": round(ev.stats.merge_seconds, 2),
                        "eval_seconds": round(ev.stats.eval_seconds, 2)},
        "seed": cfg.seed, "device": ev.device, "dtype": ev.dtype, "versions": library_versions(*RECORDED_LIBRARIES),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def _task_vectors(cfg: SweepConfig):
    """How far the domain and general models moved from the base, and the cosine of their moves (None
    when the sweep has no base model)."""
    roles = cfg.roles
    if roles.base not in cfg.models:
        return None
    return task_vectors(cfg.models[roles.base], {r: cfg.models[r] for r in (roles.general, roles.domain)})


def _rule_text(cfg: SweepConfig, gen_ref) -> str:
    goal = "clinical composite" if cfg.select.maximize == "clinical" else "instruction following"
    if cfg.select.if_retention_min is None:
        return f"maximise {goal}"
    return (f"maximise {goal} among merges whose instruction-following score is at least "
            f"{cfg.select.if_retention_min:g}% of {cfg.roles.general}'s ({_f(gen_ref)})")


def write_outputs(out: Path, rows: list[dict], summary: dict) -> str:
    """Every output file of a sweep; returns sweep.md's text."""
    with open(out / "sweep.jsonl.tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    (out / "sweep.jsonl.tmp").replace(out / "sweep.jsonl")
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_pareto(rows, summary, out / "pareto.png")
    plot_vs_t(rows, summary, out / "scores_vs_t.png")
    markdown = render_markdown(rows, summary)
    (out / "sweep.md").write_text(markdown + "\n")
    return markdown


def render_markdown(rows: list[dict], summary: dict) -> str:
    lines = [f"# Merge sweep ({summary['points']} points)", "",
             f"IF = {summary['if_metric']}; clinical = mean of {', '.join(summary['clinical_metrics'])} "
             f"({summary['scale']}); documents: {summary['selection']}.", ""]
    head = ["point", "kind", "IF", "clinical", "IF retention % [95% CI]", "clinical gain kept % [95% CI]", "Pareto"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], r["kind"] + ("" if r.get("stopped_at_rung") is None else f" (stopped at rung {r['stopped_at_rung']})"),
            _f(r["if_score"]), _f(r["clinical_score"]), fmt_with_ci(r.get("if_retention_pct"), r.get("if_retention_ci"), "-"),
            fmt_with_ci(r.get("clinical_gain_kept_pct"), r.get("clinical_gain_kept_ci"), "-"),
            "yes" if r.get("pareto") else ""]) + " |")
    lines += ["", f"Selection rule: {summary['select']['rule']}."]
    b = summary.get("best")
    lines.append(f"Best: **{b['label']}** (IF {_f(b['if_score'])}, clinical {_f(b['clinical_score'])}; IF retention "
                 f"{fmt_with_ci(b.get('if_retention_pct'), b.get('if_retention_ci'))}%, clinical gain kept "
                 f"{fmt_with_ci(b.get('clinical_gain_kept_pct'), b.get('clinical_gain_kept_ci'))}%)." if b
                 else "Best: no merge meets the rule.")
    lines.append("Intervals: 95% paired bootstrap over the evaluation documents (the point and the references "
                 "resampled together, each task on its own).")
    if summary.get("halving"):
        a = summary["halving"]["agreement"]
        lines += ["", "Successive halving: " + ", ".join(
            f"rung {r['rung']} ({r['selection']}): {r['candidates']} candidates" for r in summary["halving"]["rungs"]),
            f"Cheap vs full ranking over {a['pairs']} candidates ({a['over']}): Kendall tau "
            f"{_f(a['kendall_tau'], 2)}, Spearman {_f(a['spearman'], 2)}"
            + (f"; top-1 {'agrees' if a.get('top1_agrees') else 'differs'} ({a.get('cheap_top')} vs {a.get('full_top')})"
               if "cheap_top" in a else "") + "."]
    if summary.get("task_vectors"):
        lines += ["", "## Mergeability", "", render_task_vectors(summary["task_vectors"])]
    e = summary["evaluations"]
    lines += ["", f"Evaluations run {e['run']}, from cache {e['cached']}; merges {e['merges']} "
              f"({e['merge_seconds']} s), evaluation {e['eval_seconds']} s; wall {summary['wall_time_s']} s."]
    return "\n".join(lines)
