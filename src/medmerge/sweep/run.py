"""`medmerge sweep SWEEP.yml --out DIR`: score merges in memory over a grid (or a search), pick the best.

Outputs in DIR:

- `sweep.jsonl`: one line per point (`method`, `params`, the merge `config` with role
  names, `tasks` scores, `if_score`, `clinical_score`, retention and gain kept, cache state);
- `sweep_summary.json`: references, the Pareto front, the best point under the
  constraint, successive-halving rungs and rank agreement, counts, versions;
- `sweep.md`, `pareto.png`, `scores_vs_t.png`;
- `cache/`: one JSON file per (point, task, documents, generation settings).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import yaml

from ..errors import ConfigError, InputError
from ..evaluation.compare import default_clinical_parts, fmt_score as _f, relative_scores, summary_scores
from .config import SweepConfig, load_config
from .evaluator import Scored, SweepEvaluator
from .points import Point, Roles, expand_grid
from .select import best_under_constraint, kendall_tau, pareto_front, spearman

SCHEMA = "medmerge.sweep/1"


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
            "config": s.config, "selection": s.selection, "n_docs": s.n_docs, "tasks": s.tasks,
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


def add_relative(rows: list[dict], refs: dict[str, dict], roles: Roles) -> None:
    """IF retention and clinical gain kept (compare's formulas) relative to the general and domain references."""
    for r in rows:
        r.update(relative_scores(r, refs.get(roles.general), refs.get(roles.domain)))


def t_value(row: dict):
    t = (row.get("params") or {}).get("t")
    return t if isinstance(t, (int, float)) else None


# --- the run ------------------------------------------------------------------------------------------------------


def open_evaluator(cfg: SweepConfig, out: Path, cache: Optional[Path] = None) -> SweepEvaluator:
    roles = Roles(**cfg.roles.model_dump())
    kw = cfg.eval.kwargs(cfg.seed)
    kw.pop("device")
    limit = kw.pop("limit")
    return SweepEvaluator(cfg.models, roles=roles, tasks=cfg.eval.tasks, eval_kwargs=kw,
                          cache_dir=cache or out / "cache", seed=cfg.seed, load=cfg.load, dtype=cfg.dtype,
                          device=cfg.device if cfg.eval.device == "auto" else cfg.eval.device,
                          limit=limit, subset=cfg.eval.subset)


def run(config: str | Path, out: str | Path, *, overrides: list[str] = (), force: bool = False,
        export_best: Optional[str | Path] = None, export_force: bool = False, search: Optional[str] = None,
        trials: Optional[int] = None, storage: Optional[str] = None, worker: int = 0, cache: Optional[Path] = None,
        progress: bool = True) -> dict:
    """Run a sweep (grid, halving or optuna search) into OUT; return the summary."""
    import shutil

    out = Path(out).absolute()
    if force and (out / "cache").is_dir():
        shutil.rmtree(out / "cache")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg, info = load_config(config, out, overrides, progress=progress)
    if search not in (None, "grid", "optuna"):
        raise ConfigError(f"--search must be optuna (or grid), not {search!r}")
    if search == "optuna":
        if cfg.search is None:
            from .config import Search

            cfg.search = Search()
        if trials is not None:
            cfg.search.trials = trials
        if storage is not None:
            cfg.search.storage = storage
    (out / "sweep.yml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ev = open_evaluator(cfg, out, cache)
    scorer = Scorer(cfg, ev)
    base_sel = ev.selection(**ev.base_selection)
    log = _Log(out / "sweep.jsonl")

    refs = {}
    for role in cfg.references:
        row = scorer.row(ev.score(reference_point(role), base_sel), "reference")
        refs[role] = row
        log.add(row)
    halving = None
    if search == "optuna":
        from .search import run_search

        rows, search_info = run_search(cfg, ev, scorer, out, base_sel, log, worker=worker, progress=progress)
    else:
        points = expand_grid(cfg.grid)
        if not points:
            raise ConfigError(f"{config}: grid: is empty (or pass --search optuna with a search: section)")
        search_info = None
        if cfg.halving is not None:
            rows, halving = successive_halving(cfg, ev, scorer, points, refs, log, progress)
        else:
            rows = []
            for point in _progress(points, progress, "sweep"):
                row = scorer.row(ev.score(point, base_sel), "grid")
                rows.append(row)
                log.add(row)
    all_rows = list(refs.values()) + rows
    add_relative(all_rows, refs, ev.roles)
    summary = summarize(cfg, info, ev, scorer, all_rows, refs, halving, search_info, started)
    write_outputs(out, all_rows, summary)
    if export_best is not None:
        best = summary.get("best")
        if not best:
            raise InputError("no point meets the selection rule (select:): nothing to export; see sweep.md")
        summary["exported"] = export(cfg, best["config"], Path(export_best), force=export_force, progress=progress)
        (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


class _Log:
    """sweep.jsonl, written as points are scored (so a long sweep can be watched) and rewritten at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.path.write_text("")

    def add(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _progress(items, enabled: bool, what: str, points: Optional[list[Point]] = None):
    """Yield `items` under a rich progress bar naming the current point (`points[item]` for indices)."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    items = list(items)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[point]}")) as bar:
        task = bar.add_task(what, total=len(items), point="")
        for item in items:
            point = points[item] if points is not None else item
            bar.update(task, point=point.describe() if hasattr(point, "describe") else str(point))
            yield item
            bar.advance(task)


# --- successive halving ---------------------------------------------------------------------------------------


def successive_halving(cfg: SweepConfig, ev: SweepEvaluator, scorer: Scorer, points: list[Point], refs: dict,
                       log: _Log, progress: bool) -> tuple[list[dict], dict]:
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
        for i in _progress(alive, progress, f"rung {r + 1}/{len(h.rungs)} ({sel.label})", points):
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


# --- summary and outputs ------------------------------------------------------------------------------------------


def summarize(cfg, info, ev, scorer, rows, refs, halving, search_info, started) -> dict:
    from ..evaluation.runner import library_versions

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
        "best": best, "halving": halving, "search": search_info,
        "evaluations": {"run": ev.stats.evaluated, "cached": ev.stats.cached, "merges": ev.stats.merges,
                        "merge_seconds": round(ev.stats.merge_seconds, 2),
                        "eval_seconds": round(ev.stats.eval_seconds, 2)},
        "seed": cfg.seed, "device": ev.device, "dtype": ev.dtype, "versions": library_versions(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def _rule_text(cfg: SweepConfig, gen_ref) -> str:
    goal = "clinical composite" if cfg.select.maximize == "clinical" else "instruction following"
    if cfg.select.if_retention_min is None:
        return f"maximise {goal}"
    return (f"maximise {goal} among merges whose instruction-following score is at least "
            f"{cfg.select.if_retention_min:g}% of {cfg.roles.general}'s ({_f(gen_ref)})")


def write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    with open(out / "sweep.jsonl.tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    (out / "sweep.jsonl.tmp").replace(out / "sweep.jsonl")
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_pareto(rows, summary, out / "pareto.png")
    plot_vs_t(rows, summary, out / "scores_vs_t.png")
    (out / "sweep.md").write_text(render_markdown(rows, summary) + "\n")


def render_markdown(rows: list[dict], summary: dict) -> str:
    lines = [f"# Merge sweep ({summary['points']} points)", "",
             f"IF = {summary['if_metric']}; clinical = mean of {', '.join(summary['clinical_metrics'])} "
             f"({summary['scale']}); documents: {summary['selection']}.", ""]
    head = ["point", "kind", "IF", "clinical", "IF retention %", "clinical gain kept %", "Pareto"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], r["kind"] + ("" if r.get("stopped_at_rung") is None else f" (stopped at rung {r['stopped_at_rung']})"),
            _f(r["if_score"]), _f(r["clinical_score"]), _f(r.get("if_retention_pct")),
            _f(r.get("clinical_gain_kept_pct")), "yes" if r.get("pareto") else ""]) + " |")
    lines += ["", f"Selection rule: {summary['select']['rule']}."]
    b = summary.get("best")
    lines.append(f"Best: **{b['label']}** (IF {_f(b['if_score'])}, clinical {_f(b['clinical_score'])})." if b
                 else "Best: no merge meets the rule.")
    if summary.get("halving"):
        a = summary["halving"]["agreement"]
        lines += ["", "Successive halving: " + ", ".join(
            f"rung {r['rung']} ({r['selection']}): {r['candidates']} candidates" for r in summary["halving"]["rungs"]),
            f"Cheap vs full ranking over {a['pairs']} candidates ({a['over']}): Kendall tau "
            f"{_f(a['kendall_tau'], 2)}, Spearman {_f(a['spearman'], 2)}"
            + (f"; top-1 {'agrees' if a.get('top1_agrees') else 'differs'} ({a.get('cheap_top')} vs {a.get('full_top')})"
               if "cheap_top" in a else "") + "."]
    e = summary["evaluations"]
    lines += ["", f"Evaluations run {e['run']}, from cache {e['cached']}; merges {e['merges']} "
              f"({e['merge_seconds']} s), evaluation {e['eval_seconds']} s; wall {summary['wall_time_s']} s."]
    return "\n".join(lines)


def _colors(methods: list[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_pareto(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    methods = sorted({r["method"] for r in rows if r["kind"] != "reference"})
    colors = _colors(methods)
    for m in methods:
        pts = [r for r in rows if r["method"] == m and r["kind"] != "reference" and r["if_score"] is not None
               and r.get("stopped_at_rung") is None]
        ax.scatter([r["clinical_score"] for r in pts], [r["if_score"] for r in pts], color=colors[m], label=m,
                   alpha=0.8, s=30)
    front = [r for r in rows if r.get("pareto")]
    front.sort(key=lambda r: r["clinical_score"])
    if front:
        ax.plot([r["clinical_score"] for r in front], [r["if_score"] for r in front], "k--", lw=1, label="Pareto front")
    for r in rows:
        if r["kind"] == "reference" and r["if_score"] is not None:
            ax.scatter([r["clinical_score"]], [r["if_score"]], marker="*", s=200, color="black", zorder=5)
            ax.annotate(r["label"], (r["clinical_score"], r["if_score"]), textcoords="offset points", xytext=(6, 6))
    thr = summary["select"].get("if_reference")
    if thr and summary["select"].get("if_retention_min") is not None:
        y = thr * summary["select"]["if_retention_min"] / 100
        ax.axhline(y, color="grey", lw=0.8, ls=":", label=f"IF >= {summary['select']['if_retention_min']:g}% of instruct")
    b = summary.get("best")
    if b:
        ax.scatter([b["clinical_score"]], [b["if_score"]], s=260, facecolors="none", edgecolors="red", lw=2,
                   label=f"best: {b['label']}", zorder=6)
    ax.set_xlabel("clinical composite (0-100)")
    ax.set_ylabel("instruction following (0-100)")
    ax.set_title("instruction following vs clinical: every merge")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_t(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["kind"] != "reference"})
    colors = _colors(methods)
    for ax, key, title in ((axes[0], "if_score", "instruction following"), (axes[1], "clinical_score", "clinical composite")):
        for m in methods:
            pts = sorted(((t_value(r), r[key]) for r in rows if r["method"] == m and t_value(r) is not None
                          and r[key] is not None and r.get("stopped_at_rung") is None), key=lambda p: p[0])
            # several points per t (densities, ...): plot their best
            best: dict[float, float] = {}
            for t, v in pts:
                best[t] = max(v, best.get(t, -math.inf))
            if best:
                ax.plot(list(best), list(best.values()), marker="o", color=colors[m], label=m)
        for role, ref in summary["references"].items():
            if ref[key] is not None:
                ax.axhline(ref[key], ls=":", lw=1, color="grey")
                ax.annotate(role, (0, ref[key]), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
        ax.set_xlabel(f"t (share of {summary['roles']['domain']}; {summary['roles']['general']} gets 1 - t)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- export --------------------------------------------------------------------------------------------------------


def with_paths(config: dict, models: dict[str, Path]) -> dict:
    """A merge config with role names replaced by the models' folders (for the on-disk engine)."""
    def sub(ref):
        return str(models[ref]) if ref in models else ref

    cfg = json.loads(json.dumps(config))
    for m in cfg["models"]:
        m["model"] = sub(m["model"])
    if cfg.get("base_model"):
        cfg["base_model"] = sub(cfg["base_model"])
    if cfg.get("tokenizer_source") not in (None, "base", "union"):  # keywords of the engine, not roles
        cfg["tokenizer_source"] = sub(cfg["tokenizer_source"])
    return cfg


def export(cfg: SweepConfig, config: dict, target: Path, *, force: bool, progress: bool) -> dict:
    """Write a point's merge to disk with the streaming engine (sharded, atomic, verified)."""
    from ..merge import merge

    disk = with_paths(config, cfg.models)
    res = merge(disk, target, force=force, progress=progress)
    return {"path": str(target), "verified": bool(res.verification and res.verification.ok), "config": disk}
