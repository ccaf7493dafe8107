"""`medmerge demo`: the whole experiment on the embedded synthetic clinical world, ending in a report.

1. build (or copy from the cache) the world: base, instruct, clinical, instruct_ft;
2. sweep linear, SLERP, task arithmetic, TIES and DARE-TIES merges of clinical x instruct
   in memory, with base and instruct_ft as references: the forgetting (instruct vs
   instruct fine-tuned on the clinical task), the Pareto front, the best merge that keeps
   at least half of instruct's instruction following;
3. the few-shot experiment: instruct and that merge fine-tuned on 16, 64 and 256 examples;
4. report.html / report.md, a short table on the terminal.

Everything is written as configs under OUT/configs first, then run by the same commands
users run (`medmerge sweep`, `medmerge fewshot`, `medmerge report`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ..errors import MedmergeError
from ..evaluation.compare import fmt_with_ci
from ..io.records import read_jsonl
from ..miniclinic.build import build, code_version
from ..miniclinic.world import TASKS_DIR
from .fewshot import run as run_fewshot
from .report import write_report
from ..training.config import SEED_MAX
from .rundir import open_run_dir
from .sweep.points import setting, short
from .sweep.run import run as run_sweep

TASKS = ["mm_miniclinic_if", "mm_miniclinic_mcq", "mm_miniclinic_gen"]
SCORES = {"if_metric": "mm_miniclinic_if/prompt_level_strict_acc",
          "clinical_metrics": ["mm_miniclinic_mcq/acc", "mm_miniclinic_gen/rougeL"]}
GRID = [
    {"method": "linear", "t": [0.1, 0.2, 0.3, 0.5, 0.7]},
    {"method": "slerp", "t": [0.1, 0.3, 0.5]},
    # lambda scales the summed task vectors: at t = 1/3 and lambda 1.8 that is base + 1.2 instruct + 0.6 clinical.
    # Instruction following sits on a ridge at full instruct weight, so the (t, 1 - t) weights alone (lambda 1)
    # fall off it as soon as clinical gets any weight
    {"method": "task_arithmetic", "t": [0.3, 0.35, 0.4], "lambda": [1.0, 1.5, 1.8]},
    {"method": "ties", "t": [0.1, 0.3, 0.5, 0.7], "density": [0.5]},
    # TIES on the same ridge: unnormalised weights scaled by lambda, as task arithmetic above, with trimming and
    # sign election on top (density 0.9 keeps most of each task vector)
    {"method": "ties", "t": [0.3, 0.35, 0.4], "density": [0.9], "lambda": [1.8], "normalize": [False]},
    {"method": "dare_ties", "t": [0.3, 0.5, 0.7], "density": [0.5]},
]
PRESETS = {
    # eval documents per task, few-shot steps (the same for every k and start)
    "quick": {"limit": 50, "fewshot_steps": 30},
    "full": {"limit": 100, "fewshot_steps": 60},
}
IF_RETENTION_MIN = 50.0


def _eval_section(world: Path, limit: int) -> dict:
    return {"tasks": TASKS, "include_paths": [str(TASKS_DIR)], "data_dir": str(world / "data"), "limit": limit,
            "batch_size": 32, "max_new_tokens": 48, "device": "cpu"}


def sweep_config(world: Path, limit: int, seed: int) -> dict:
    models = {m: str(world / "models" / m) for m in ("base", "clinical", "instruct", "instruct_ft")}
    return {"models": models, "references": ["instruct", "clinical", "base", "instruct_ft"], "grid": GRID,
            "eval": _eval_section(world, limit), "scores": SCORES,
            "select": {"if_retention_min": IF_RETENTION_MIN, "maximize": "clinical"}, "seed": seed, "device": "cpu"}


def fewshot_config(world: Path, sweep_dir: Path, limit: int, steps: int, seed: int) -> dict:
    return {
        "starts": {"instruct": str(world / "models" / "instruct"), "merged": {"sweep": str(sweep_dir)}},
        "data": {"path": str(world / "data" / "tasks" / "gen_train.jsonl"), "prompt": "prompt",
                 "response": "impression"},
        "k": [16, 64, 256], "seed": seed, "max_seq_length": 128,
        "training": {"max_steps": steps, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.05,
                     "logging_steps": max(1, steps // 10), "save_steps": 10 ** 9, "threads": 2, "device": "cpu"},
        "eval": _eval_section(world, limit), "scores": SCORES,
        "claim": {"model": "merged", "k": 64, "versus": "instruct", "versus_k": 256, "tolerance": 1.0},
    }


def forgetting(summary: dict) -> dict:
    refs = summary["references"]
    before, after = refs["instruct"], refs["instruct_ft"]
    kept = 100 * after["if_score"] / before["if_score"] if before["if_score"] else None
    statement = (f"Fine-tuning on the clinical task moved instruction following from {before['if_score']:.1f} to "
                 f"{after['if_score']:.1f}" + (f" ({kept:.0f}% kept)" if kept is not None else "")
                 + f" and the clinical composite from {before['clinical_score']:.1f} to {after['clinical_score']:.1f}.")
    return {"before": "instruct", "after": "instruct_ft", "if_metric": summary["if_metric"],
            "clinical_metrics": summary["clinical_metrics"], "if_kept_pct": kept, "statement": statement,
            "models": [{"name": n, "if_score": refs[n]["if_score"], "clinical_score": refs[n]["clinical_score"]}
                       for n in ("base", "instruct", "instruct_ft", "clinical") if n in refs]}


KEEP_IF, KEEP_GAIN = 90.0, 50.0  # "the cure": a merge keeping this much of IF and of the clinical gain
DEAD = 50.0  # a merge under this share of both skills is in the dead zone
# below these (instruct's IF in %, the clinical gain in points) shares are noise: a 3-point gain measured on 100
# documents gave a share of 282% [-2447, 2431]
MIN_IF, MIN_GAIN = 5.0, 5.0


def finding(summary: dict, rows: list[dict]) -> dict:
    """What the sweep found, in numbers: merges that keep both skills, the methods on the Pareto front, the dead
    zone (merges under half of both instruct's instruction following and the clinical gain). Shares of a clinical
    gain under MIN_GAIN points (or of instruct's IF under MIN_IF) mean nothing, so the statement says so instead."""
    refs = summary.get("references") or {}
    if_ref = (refs.get("instruct") or {}).get("if_score")
    c_ins, c_clin = ((refs.get(m) or {}).get("clinical_score") for m in ("instruct", "clinical"))
    gain = c_clin - c_ins if None not in (c_ins, c_clin) else None
    weak = []
    if if_ref is not None and if_ref < MIN_IF:
        weak.append(f"instruct follows only {if_ref:.1f}% of the prompts (under {MIN_IF:g}%)")
    if gain is not None and gain < MIN_GAIN:
        weak.append(f"the clinical model gains {gain:+.1f} points over instruct (under {MIN_GAIN:g})")
    if weak:
        text = f"Shares are not judged: {' and '.join(weak)}, so a share of them would be noise"
        keep = [r for r in rows if r["kind"] != "reference" and r.get("if_retention_pct") is not None
                and r["if_retention_pct"] >= KEEP_IF and r.get("clinical_score") is not None]
        if keep and None not in (c_ins, c_clin):
            b = max(keep, key=lambda r: (r["clinical_score"], r["if_score"]))
            text += (f". In points: of the merges keeping at least {KEEP_IF:g}% of instruct's IF, {b['label']} scores "
                     f"highest on the clinical composite, {b['clinical_score']:.1f} (IF {b['if_score']:.1f}), against "
                     f"instruct's {c_ins:.1f} and the clinical model's {c_clin:.1f}")
        return {"keep_if_pct": KEEP_IF, "keep_gain_pct": KEEP_GAIN, "merges": 0, "keep_both": [], "top": None,
                "pareto_methods": [], "front_is_l": None, "dead_zone": {}, "statement": text + "."}
    merges = [r for r in rows if r["kind"] != "reference" and r.get("if_retention_pct") is not None
              and r.get("clinical_gain_kept_pct") is not None]
    both = [r for r in merges if r["if_retention_pct"] >= KEEP_IF and r["clinical_gain_kept_pct"] >= KEEP_GAIN]
    top = max(both, key=lambda r: (r["clinical_gain_kept_pct"], r["if_retention_pct"])) if both else None
    front = sorted({r["method"] for r in rows if r.get("pareto") and r["kind"] != "reference"})
    middle = [r for r in merges if r.get("pareto") and r["if_retention_pct"] >= DEAD
              and r["clinical_gain_kept_pct"] >= DEAD]
    dead: dict[str, list] = {}  # setting (method and every parameter but t) -> its t values in the dead zone
    for r in merges:
        if r["if_retention_pct"] < DEAD and r["clinical_gain_kept_pct"] < DEAD:
            dead.setdefault(setting(r), []).append(r["params"].get("t"))

    def pct(r, key):
        return fmt_with_ci(r[f"{key}_pct"], r.get(f"{key}_ci"))

    text = [f"Of {len(merges)} merges, {len(both)} keep at least {KEEP_IF:g}% of instruct's instruction following "
            f"and at least {KEEP_GAIN:g}% of the clinical gain"]
    if top:
        text[0] += (f"; the one keeping most of the gain, {top['label']}, keeps {pct(top, 'if_retention')}% of IF and "
                    f"{pct(top, 'clinical_gain_kept')}% of the gain (IF {top['if_score']:.1f}, clinical "
                    f"{top['clinical_score']:.1f}; 95% paired bootstrap intervals)")
    text.append(f"The Pareto front holds merges of {', '.join(front) if front else 'no method'}"
                + ("" if middle else f", none of them above {DEAD:g}% of both skills (an L-shaped front)"))
    text.append("Dead zone (under half of both skills): " + ("; ".join(
        f"{m} at t = {', '.join(short(t) for t in sorted(t for t in ts if isinstance(t, (int, float)))) or '-'}"
        for m, ts in sorted(dead.items())) if dead else "none"))
    return {"keep_if_pct": KEEP_IF, "keep_gain_pct": KEEP_GAIN, "merges": len(merges),
            "keep_both": [r["label"] for r in both], "top": top and {k: top.get(k) for k in (
                "label", "method", "params", "if_score", "clinical_score", "if_retention_pct", "if_retention_ci",
                "clinical_gain_kept_pct", "clinical_gain_kept_ci")},
            "pareto_methods": front, "front_is_l": not middle, "dead_zone": dead, "statement": ". ".join(text) + "."}


def run_demo(out: str | Path = "runs/demo", preset: str = "quick", seed: int = 0, *, progress: bool = True) -> dict:
    """Run the demo into OUT (re-runs reuse the world cache and the sweep's result cache)."""
    if preset not in PRESETS:
        raise MedmergeError(f"unknown preset {preset!r}; use quick or full")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise MedmergeError(f"--seed {seed!r}: use a whole number from 0 to {SEED_MAX} (numpy's seed range)")
    p = PRESETS[preset]
    console = Console()
    out = open_run_dir(out, force=False, results=())
    started = time.perf_counter()
    timings = {}

    world = out / "world"
    previous = json.loads((world / "summary.json").read_text()) if (world / "summary.json").is_file() else {}
    if (previous.get("preset"), previous.get("seed"), previous.get("code_version")) != (preset, seed, code_version()):
        console.print(f"[bold]1/4[/] the synthetic clinical world ({preset}; from the cache when built before)")
        build(world, preset=preset, seed=seed, force=True, progress=progress)
    timings["world"] = round(time.perf_counter() - started, 1)

    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "sweep.yml").write_text(yaml.safe_dump(sweep_config(world, p["limit"], seed), sort_keys=False))
    console.print("[bold]2/4[/] sweeping linear, SLERP, task arithmetic, TIES and DARE-TIES merges in memory")
    t0 = time.perf_counter()
    sweep = run_sweep(configs / "sweep.yml", out / "sweep", progress=progress)
    timings["sweep"] = round(time.perf_counter() - t0, 1)

    (configs / "fewshot.yml").write_text(yaml.safe_dump(
        fewshot_config(world, out / "sweep", p["limit"], p["fewshot_steps"], seed), sort_keys=False))
    console.print("[bold]3/4[/] few-shot fine-tuning of instruct and the best merge on 16, 64 and 256 examples")
    t0 = time.perf_counter()
    few = run_fewshot(configs / "fewshot.yml", out / "fewshot", force=True, progress=progress)
    timings["fewshot"] = round(time.perf_counter() - t0, 1)

    console.print("[bold]4/4[/] the report")
    forget = forgetting(sweep)
    best = sweep.get("best")
    found = finding(sweep, read_jsonl(out / "sweep" / "sweep.jsonl"))
    headline = [forget["statement"], found["statement"],
                (f"Best merge keeping at least {IF_RETENTION_MIN:g}% of instruct's instruction following: "
                 f"{best['label']} (IF {best['if_score']:.1f}, clinical {best['clinical_score']:.1f})." if best
                 else f"No merge keeps {IF_RETENTION_MIN:g}% of instruct's instruction following."),
                few["claim"]["measured"] if few.get("claim") else ""]
    timings["total"] = round(time.perf_counter() - started, 1)
    demo = {"schema": "medmerge.demo/1", "preset": preset, "seed": seed, "forgetting": forget, "best": best,
            "finding": found,
            "fewshot_claim": few.get("claim"), "headline": [h for h in headline if h], "timings_s": timings,
            "sweep": str(out / "sweep"), "fewshot": str(out / "fewshot")}
    (out / "demo.json").write_text(json.dumps(demo, indent=2, default=str) + "\n")
    report = write_report(out, title=f"medmerge demo ({preset} preset)", force=True)
    demo["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    demo["report"] = report["html"]
    (out / "demo.json").write_text(json.dumps(demo, indent=2, default=str) + "\n")
    print_summary(console, demo, few)
    return demo


def print_summary(console: Console, demo: dict, few: dict) -> None:
    table = Table(title="medmerge demo")
    for col in ("model", "instruction following", "clinical composite"):
        table.add_column(col)
    for m in demo["forgetting"]["models"]:
        table.add_row(m["name"], f"{m['if_score']:.1f}", f"{m['clinical_score']:.1f}")
    b = demo.get("best")
    if b:
        table.add_row(f"best merge: {b['label']}", f"{b['if_score']:.1f}", f"{b['clinical_score']:.1f}")
    for r in few["runs"]:
        if (r["start"], r["k"]) in (("merged", 64), ("instruct", 256)):
            table.add_row(f"{r['start']} + {r['k']} examples", f"{r['if_score']:.1f}", f"{r['clinical_score']:.1f}")
    console.print(table)
    for line in demo["headline"]:
        console.print(line)
    console.print(f"report: {demo['report']} (wall time {demo['timings_s']['total']:.0f} s)")
