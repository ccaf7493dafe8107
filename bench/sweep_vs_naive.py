#!/usr/bin/env python
"""Benchmark an 11-point interpolation sweep: `medmerge sweep` against the loop users write today.

The loop users write today, per point t: a mergekit YAML (`linear`, the clinical
model at weight t, the instruct model at 1 - t, float32), `mergekit-yaml` to
disk, then the `lm_eval` CLI on the merged folder. `medmerge sweep` does the same
points in one process: one loaded model, each merge written into its
parameters in memory, lm-eval called in-process.

What it does:

1. Builds the synthetic clinical world (`medmerge miniclinic build DIR --preset
   P`) unless --world names a built one (or the default folder
   bench/_work/miniclinic/<preset> holds one).
2. Warms the page cache (an untimed child imports torch, transformers,
   lm-eval, mergekit and medmerge's sweep).
3. Runs `medmerge sweep SWEEP.yml --out OUT --quiet` on a fresh OUT (empty
   cache), one child process: grid `linear` at t = 0, 0.1, ..., 1 (--points),
   `references: []` so only the grid points are scored, tasks
   mm_miniclinic_if, mm_miniclinic_mcq, mm_miniclinic_gen, `limit` documents
   each, batch size, max_new_tokens, chat template auto, seed, float32, cpu.
4. Runs the naive loop: for each t, `mergekit-yaml cfg.yml MERGED --quiet`,
   then `lm_eval run --model hf --model_args pretrained=MERGED,dtype=float32
   --tasks ... --include_path TASKS --metadata '{"data_dir": ...}' --limit N
   --device cpu --batch_size B --gen_kwargs max_gen_toks=M
   --apply_chat_template --seed S --output_path ...`: the settings medmerge's
   evaluate() passes to simple_evaluate (the chat template is applied because
   the world's tokenizer has one; seed S for python/numpy/torch/fewshot;
   max_new_tokens is lm-eval's max_gen_toks). medmerge's bootstrap_iters=1000
   against the CLI's 100,000 only changes bootstrapped stderrs, which are
   not compared (sweep.jsonl has no stderr).
5. Compares every metric of every task at every t (medmerge's OUT/sweep.jsonl
   against lm_eval's results_*.json): identical means the same (task, metric)
   sets and |difference| <= 1e-9 everywhere (also reported: how many are
   exactly ==).
6. Prints a table (per-point seconds, totals, CPU, peak RSS, the ratio naive /
   medmerge, the metric verdict), machine info and the commands, and writes
   bench/_work/sweep_vs_naive/result.json. Exits 1 if anything failed or a
   metric differs.

Every tool runs as a child process with the same thread count (wall time, and
CPU time and peak RSS from wait4). This script imports neither torch nor
medmerge itself, so that the children's ru_maxrss is their own.

    .venv/bin/python bench/sweep_vs_naive.py --world bench/_work/miniclinic/full --limit 50
    .venv/bin/python bench/sweep_vs_naive.py --points 3 --limit 5      # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # bench/_common.py

ROOT, WORK = _common.ROOT, _common.WORK
OUT = WORK / "sweep_vs_naive"
BIN = Path(sys.executable).parent
run_timed, shell, fmt, steal_pct = _common.run_timed, _common.shell, _common.fmt, _common.steal_pct
TASKS = ("mm_miniclinic_if", "mm_miniclinic_mcq", "mm_miniclinic_gen")
TOL = 1e-9


# ----------------------------------------------------------------------------- setup


def tasks_dir(env: dict) -> Path:
    """medmerge.miniclinic.world.TASKS_DIR, read in a child (importing medmerge loads torch here)."""
    code = "from medmerge.miniclinic.world import TASKS_DIR; print(TASKS_DIR)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def ensure_world(world: Path, preset: str, env: dict) -> Path:
    """A built world at `world` (models/{base,clinical,instruct}, data/), built with `medmerge miniclinic build`."""
    world = world.absolute()
    if all((world / "models" / m / "config.json").is_file() for m in ("base", "clinical", "instruct")) and \
            (world / "data" / "eval").is_dir():
        return world
    if world.exists() and any(world.iterdir()):
        sys.exit(f"{world} exists but is not a built world (models/{{base,clinical,instruct}}, data/eval); "
                 "pass another --world or remove it")
    cmd = [str(BIN / "medmerge"), "miniclinic", "build", str(world), "--preset", preset, "--quiet"]
    print(f"building the world (untimed): {shell(cmd)}", flush=True)
    r = run_timed(cmd, env, OUT / "logs" / f"world-build-{preset}.log", 3600)
    if r["rc"] != 0:
        sys.exit(f"world build failed (rc {r['rc']}); see {r['log']}")
    print(f"  built in {r['wall_s']:.0f}s", flush=True)
    return world


def grid(points: int) -> list[float]:
    """t = 0, 1/(n-1), ..., 1 (0, 0.1, ..., 1 for 11 points), as short decimals."""
    if points < 2:
        sys.exit("--points must be at least 2")
    return [round(i / (points - 1), 10) for i in range(points)]


def complement(t: float) -> float:
    return round(1.0 - float(t), 12)  # as medmerge.experiments.sweep.points._complement: 1 - 0.7 is 0.3, not 0.30000000000000004


def yaml_dump(obj) -> str:
    """JSON is YAML; keeps this process free of a yaml import and the values' text exact."""
    return json.dumps(obj, indent=2) + "\n"


def sweep_config(world: Path, tasks_folder: Path, ts: list[float], args) -> dict:
    return {
        "models": {r: str(world / "models" / r) for r in ("base", "clinical", "instruct")},
        "roles": {"domain": "clinical", "general": "instruct", "base": "base"},
        "references": [],  # only the grid points are scored (the naive loop evaluates nothing else)
        "grid": [{"method": "linear", "t": ts}],
        "eval": {"tasks": list(args.tasks), "include_paths": [str(tasks_folder)], "data_dir": str(world / "data"),
                 "limit": args.limit, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                 "chat_template": "auto", "device": "cpu"},
        "scores": {"if_metric": "mm_miniclinic_if/prompt_level_strict_acc",
                   "clinical_metrics": ["mm_miniclinic_mcq/acc", "mm_miniclinic_gen/rougeL"]},
        "select": {"if_retention_min": None, "maximize": "clinical"},  # no references: no retention constraint
        "seed": args.seed, "dtype": "float32", "device": "cpu",
    }


def mergekit_config(world: Path, t: float) -> dict:
    """What a user writes for one point: clinical at t, instruct at 1 - t (normalize: mergekit's default, true)."""
    return {"merge_method": "linear",
            "models": [{"model": str(world / "models" / "clinical"), "parameters": {"weight": t}},
                       {"model": str(world / "models" / "instruct"), "parameters": {"weight": complement(t)}}],
            "dtype": "float32"}


def naive_commands(world: Path, tasks_folder: Path, cfg: Path, merged: Path, le_out: Path, args) -> dict:
    return {
        "mergekit": [str(BIN / "mergekit-yaml"), str(cfg), str(merged), "--quiet"],
        "lm_eval": [str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={merged},dtype=float32",
                    "--tasks", ",".join(args.tasks), "--include_path", str(tasks_folder),
                    "--metadata", json.dumps({"data_dir": str(world / "data")}), "--limit", str(args.limit),
                    "--device", "cpu", "--batch_size", str(args.batch_size),
                    "--gen_kwargs", f"max_gen_toks={args.max_new_tokens}", "--apply_chat_template",
                    "--seed", str(args.seed), "--output_path", str(le_out)],
    }


WARMUP = ("import torch, transformers, lm_eval.evaluator, lm_eval.models.huggingface, mergekit.merge, "
          "medmerge.experiments.sweep.run, medmerge.evaluation.runner")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"




# ----------------------------------------------------------------------------- results


def _num(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if isinstance(v, float) and math.isnan(v) else float(v)


def lm_eval_metrics(out: Path) -> tuple[dict, Path]:
    """{task: {metric: value}} from the newest results_*.json under OUT (medmerge's names: 'acc,none' -> 'acc').

    Written here rather than calling medmerge.evaluation.runner.convert_results on purpose: the benchmark
    checks medmerge's numbers against lm-eval's own file, so it reads that file independently (and this
    process never imports medmerge, so the children's peak RSS is not inflated by it)."""
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no results_*.json under {out}")
    raw = json.loads(files[-1].read_text())
    scores: dict = {}
    for task, row in raw.get("results", {}).items():
        for key, value in row.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            if name.endswith("_stderr") or "_stderr," in name:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scores.setdefault(task, {})[name] = value
    return scores, files[-1]


def sweep_rows(out: Path) -> dict[float, dict]:
    """t -> the grid row of OUT/sweep.jsonl."""
    rows = {}
    for line in (out / "sweep.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("kind") != "grid":
            continue
        rows[round(float(row["params"]["t"]), 10)] = row
    return rows


def compare(mm: dict, le: dict) -> dict:
    """Max |medmerge - lm_eval| over every (task, metric) of either side; missing entries listed."""
    diffs, missing, exact = {}, [], 0
    for task in sorted(set(mm) | set(le)):
        for metric in sorted(set(mm.get(task, {})) | set(le.get(task, {}))):
            x, y = _num(mm.get(task, {}).get(metric)), _num(le.get(task, {}).get(metric))
            if x is None or y is None:
                if not (x is None and y is None and metric in mm.get(task, {}) and metric in le.get(task, {})):
                    missing.append(f"{task}/{metric}: medmerge={mm.get(task, {}).get(metric)} "
                                   f"lm_eval={le.get(task, {}).get(metric)}")
                continue
            diffs[f"{task}/{metric}"] = abs(x - y)
            exact += x == y
    worst = max(diffs.values(), default=0.0)
    return {"n": len(diffs), "exact": exact, "max_abs_diff": worst, "missing": missing,
            "identical": not missing and bool(diffs) and worst <= TOL,
            "differing": {k: v for k, v in diffs.items() if v > TOL}}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, default=None,
                    help="a built synthetic world (default bench/_work/miniclinic/<preset>, built if missing)")
    ap.add_argument("--preset", default="quick", help="world preset to build when --world is missing (quick|full)")
    ap.add_argument("--points", type=int, default=11, help="grid points t = 0, 1/(n-1), ..., 1")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--limit", type=int, default=50, help="documents per task (lm-eval's first N)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="generation cap (lm-eval's max_gen_toks)")
    ap.add_argument("--seed", type=int, default=0, help="python/numpy/torch/fewshot seeds (all four)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed import warm-up")
    ap.add_argument("--order", choices=("medmerge-first", "naive-first"), default="medmerge-first")
    ap.add_argument("--timeout", type=float, default=1800, help="warn when one child takes longer than this")
    ap.add_argument("--json", type=Path, default=OUT / "result.json")
    args = ap.parse_args()

    env = _common.child_env(args.threads)
    env.pop("MEDMERGE_DATA", None)  # both tools get the data folder explicitly
    OUT.mkdir(parents=True, exist_ok=True)
    world = ensure_world(args.world or WORK / "miniclinic" / args.preset, args.preset, env)
    tasks_folder = tasks_dir(env)
    ts = grid(args.points)
    info = _common.machine_info(("torch", "transformers", "lm_eval", "mergekit", "medmerge"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = shell([".venv/bin/python", "bench/sweep_vs_naive.py", *sys.argv[1:]])
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_bytes'] / 2**30:.0f} GiB; python {info['python']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, lm_eval {info['lm_eval']}, mergekit "
          f"{info['mergekit']}; medmerge {info['medmerge_commit']}{' (src dirty)' if info['medmerge_src_dirty'] else ''};"
          f" {started}", flush=True)
    print(f"world: {world}; tasks {','.join(args.tasks)}; limit {args.limit}; batch {args.batch_size}; max_new_tokens "
          f"{args.max_new_tokens}; seed {args.seed}; {args.threads} threads; t = {', '.join(f'{t:g}' for t in ts)}",
          flush=True)
    print(f"command: {command}", flush=True)

    # fresh outputs: an empty sweep cache, no merged folders or lm_eval results left from an earlier run
    mm_dir, naive_dir, logs = OUT / "medmerge", OUT / "naive", OUT / "logs"
    for d in (mm_dir, naive_dir):
        shutil.rmtree(d, ignore_errors=True)
    naive_dir.mkdir(parents=True)
    mm_dir.mkdir(parents=True)
    sweep_yml = mm_dir / "sweep_config.yml"
    sweep_yml.write_text(yaml_dump(sweep_config(world, tasks_folder, ts, args)))
    sweep_out = mm_dir / "out"
    mm_cmd = [str(BIN / "medmerge"), "sweep", str(sweep_yml), "--out", str(sweep_out), "--quiet"]
    print(f"medmerge: {shell(mm_cmd)}", flush=True)
    example = naive_commands(world, tasks_folder, naive_dir / "t<T>" / "merge.yml", naive_dir / "t<T>" / "merged",
                             naive_dir / "t<T>" / "lm_eval", args)
    print(f"naive, per point: {shell(example['mergekit'])}\n                  {shell(example['lm_eval'])}", flush=True)

    if not args.no_warmup:
        r = run_timed([sys.executable, "-c", WARMUP], env, logs / "warmup.log", args.timeout)
        print(f"warm-up (imports, untimed): rc={r['rc']} {r['wall_s']:.1f}s", flush=True)

    failed = False

    def run_medmerge() -> dict:
        print(f"\n[medmerge sweep] (load average before: {loadavg()})", flush=True)
        r, steal = steal_pct(lambda: run_timed(mm_cmd, env, logs / "medmerge_sweep.log", args.timeout))
        r["steal_pct"], r["loadavg_after"] = steal, loadavg()
        print(f"  rc={r['rc']} wall={r['wall_s']:.1f}s cpu={r['user_s'] + r['sys_s']:.1f}s "
              f"peak RSS={r['peak_rss_mb']:.0f} MB steal={steal}% load average after: {r['loadavg_after']}", flush=True)
        return r

    def run_naive() -> dict:
        print(f"\n[naive loop: mergekit-yaml + lm_eval per point] (load average before: {loadavg()})", flush=True)
        points = []

        def loop():
            for t in ts:
                d = naive_dir / f"t{t:g}"
                d.mkdir(parents=True)
                cfg = d / "merge.yml"
                cfg.write_text(yaml_dump(mergekit_config(world, t)))
                cmds = naive_commands(world, tasks_folder, cfg, d / "merged", d / "lm_eval", args)
                p = {"t": t}
                for tool in ("mergekit", "lm_eval"):
                    p[tool] = run_timed(cmds[tool], env, logs / f"naive-t{t:g}-{tool}.log", args.timeout)
                    if p[tool]["rc"] != 0:
                        break
                ok = all(p.get(k, {}).get("rc") == 0 for k in ("mergekit", "lm_eval"))
                line = (f"  t={t:<4g} mergekit {p['mergekit']['wall_s']:5.1f}s"
                        + (f"  lm_eval {p['lm_eval']['wall_s']:5.1f}s" if "lm_eval" in p else "")
                        + ("" if ok else f"  FAILED (see {p.get('lm_eval', p['mergekit'])['log']})"))
                print(line, flush=True)
                points.append(p)

        t0 = time.perf_counter()
        _, steal = steal_pct(loop)
        wall = time.perf_counter() - t0
        runs = [p[k] for p in points for k in ("mergekit", "lm_eval") if k in p]
        total = {"rc": max((abs(r["rc"]) for r in runs), default=1), "wall_s": round(wall, 3),
                 "children_wall_s": round(sum(r["wall_s"] for r in runs), 3),
                 "user_s": round(sum(r["user_s"] for r in runs), 2), "sys_s": round(sum(r["sys_s"] for r in runs), 2),
                 "peak_rss_mb": max((r["peak_rss_mb"] for r in runs), default=0.0), "steal_pct": steal,
                 "loadavg_after": loadavg(),
                 "points": points}
        print(f"  total wall={wall:.1f}s cpu={total['user_s'] + total['sys_s']:.1f}s "
              f"peak RSS={total['peak_rss_mb']:.0f} MB steal={steal}% load average after: {total['loadavg_after']}",
              flush=True)
        return total

    if args.order == "medmerge-first":
        mm, naive = run_medmerge(), run_naive()
    else:
        naive, mm = run_naive(), run_medmerge()
    if mm["rc"] != 0 or naive["rc"] != 0:
        failed = True

    # ------------------------------------------------------------------ metrics
    per_point, all_cmp = [], {"n": 0, "exact": 0, "max_abs_diff": 0.0, "missing": [], "differing": {}}
    rows = sweep_rows(sweep_out) if (sweep_out / "sweep.jsonl").is_file() else {}
    summary = {}
    if (sweep_out / "sweep_summary.json").is_file():
        summary = json.loads((sweep_out / "sweep_summary.json").read_text())
    for p in naive["points"]:
        t = p["t"]
        entry = {"t": t, "mergekit_s": p["mergekit"]["wall_s"], "lm_eval_s": p.get("lm_eval", {}).get("wall_s"),
                 "naive_s": round(p["mergekit"]["wall_s"] + p.get("lm_eval", {}).get("wall_s", 0.0), 3)}
        row = rows.get(round(t, 10))
        if row is not None:
            entry["medmerge_s"] = row.get("seconds")
            entry["medmerge_n_docs"] = row.get("n_docs")
        if row is None or p.get("lm_eval", {}).get("rc") != 0:
            entry["metrics"] = None
            failed = True
        else:
            le, le_file = lm_eval_metrics(naive_dir / f"t{t:g}" / "lm_eval")
            c = compare(row["tasks"], le)
            entry.update(metrics=c, medmerge_values=row["tasks"], lm_eval_values=le,
                         lm_eval_file=str(le_file.relative_to(ROOT)))
            all_cmp["n"] += c["n"]
            all_cmp["exact"] += c["exact"]
            all_cmp["max_abs_diff"] = max(all_cmp["max_abs_diff"], c["max_abs_diff"])
            all_cmp["missing"] += [f"t={t:g} {m}" for m in c["missing"]]
            all_cmp["differing"].update({f"t={t:g} {k}": v for k, v in c["differing"].items()})
        per_point.append(entry)
    all_cmp["identical"] = (bool(per_point) and all(e.get("metrics") and e["metrics"]["identical"] for e in per_point)
                            and len(rows) == len(ts))
    if not all_cmp["identical"]:
        failed = True
    ratio = naive["wall_s"] / mm["wall_s"] if mm["rc"] == 0 and naive["rc"] == 0 else None
    cpu_ratio = ((naive["user_s"] + naive["sys_s"]) / (mm["user_s"] + mm["sys_s"])
                 if ratio is not None and mm["user_s"] + mm["sys_s"] > 0 else None)

    # ------------------------------------------------------------------ report
    print(f"\n{command}\n{info['cpu']}, {info['cores']} cores; medmerge {info['medmerge_commit']}"
          f"{' (src dirty)' if info['medmerge_src_dirty'] else ''}; {started}; world {world.name} "
          f"({world}); {len(ts)} points, limit {args.limit}, batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, seed {args.seed}, {args.threads} threads\n")
    print("| t | mergekit-yaml s | lm_eval CLI s | naive point s | medmerge point s (in-process) | metrics identical "
          "(max abs diff) |")
    print("|---|---|---|---|---|---|")
    for e in per_point:
        m = e.get("metrics")
        ident = f"{'yes' if m['identical'] else 'NO'} ({m['max_abs_diff']:.3g}, {m['exact']}/{m['n']} ==)" if m else "-"
        print(f"| {e['t']:g} | {fmt(e['mergekit_s'])} | {fmt(e['lm_eval_s'])} | {fmt(e['naive_s'])} | "
              f"{fmt(e.get('medmerge_s'), 2)} | {ident} |")
    in_points = sum(e.get("medmerge_s") or 0.0 for e in per_point)
    print(f"| **total** | {fmt(sum(e['mergekit_s'] for e in per_point))} | "
          f"{fmt(sum(e['lm_eval_s'] or 0.0 for e in per_point))} | {fmt(naive['wall_s'])} (loop wall) | "
          f"{fmt(mm['wall_s'])} (process wall; {fmt(in_points)} in points, {fmt(mm['wall_s'] - in_points)} start-up, "
          f"model load and outputs) | |")
    print()
    print("| | naive loop | medmerge sweep | **naive / medmerge** |")
    print("|---|---|---|---|")
    print(f"| wall s | {fmt(naive['wall_s'])} | {fmt(mm['wall_s'])} | **{fmt(ratio, 2)}x** |")
    print(f"| CPU s (user+sys) | {fmt(naive['user_s'] + naive['sys_s'])} | {fmt(mm['user_s'] + mm['sys_s'])} | "
          f"{fmt(cpu_ratio, 2)}x |")
    print(f"| peak RSS MB (largest child) | {fmt(naive['peak_rss_mb'], 0)} | {fmt(mm['peak_rss_mb'], 0)} | "
          f"{fmt(naive['peak_rss_mb'] / mm['peak_rss_mb'] if mm['peak_rss_mb'] else None, 2)}x |")
    print(f"| processes started | {2 * len(per_point)} | 1 | |")
    goal = ratio is not None and ratio >= 5.0
    print(f"\nwall-time ratio naive / medmerge: {fmt(ratio, 2)}x (goal >= 5x: {'met' if goal else 'NOT met'})")
    print(f"metrics: {all_cmp['n']} (t, task, metric) values compared over {len(per_point)} points, "
          f"{all_cmp['exact']} exactly equal, max |medmerge - lm_eval| = {all_cmp['max_abs_diff']:.3g}; "
          f"identical (<= {TOL:g}): {'yes' if all_cmp['identical'] else 'NO'}")
    for miss in all_cmp["missing"]:
        print(f"  missing: {miss}")
    for k, v in sorted(all_cmp["differing"].items()):
        print(f"  differs: {k}: {v:.3g}")
    if summary.get("evaluations"):
        ev = summary["evaluations"]
        print(f"medmerge sweep inside: {ev['merges']} in-memory merges ({ev['merge_seconds']}s), evaluation "
              f"{ev['eval_seconds']}s, {ev['run']} (point, task) evaluations run, {ev['cached']} cached; "
              f"its own wall_time_s {summary.get('wall_time_s')}")

    result = {
        "machine": info, "started": started, "command": command, "world": str(world),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "t": ts,
        "commands": {"medmerge": shell(mm_cmd), "mergekit_per_point": shell(example["mergekit"]),
                     "lm_eval_per_point": shell(example["lm_eval"])},
        "sweep_config": sweep_config(world, tasks_folder, ts, args), "mergekit_config_example": mergekit_config(world, ts[1]),
        "medmerge": {**mm, "summary_evaluations": summary.get("evaluations"), "summary_wall_time_s": summary.get("wall_time_s")},
        "naive": naive, "points": per_point, "ratio_wall": ratio, "ratio_cpu": cpu_ratio, "goal_5x_met": goal,
        "metrics": all_cmp, "ok": not failed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
