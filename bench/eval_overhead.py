#!/usr/bin/env python
"""Benchmark `medmerge eval` against the plain `lm_eval` CLI: same model, tasks, limit and settings.

What it does (see docs/benchmarks.md, "medmerge eval vs lm_eval CLI", for results):

1. Builds (or reuses) a small random Llama with `medmerge.tiny.make_model`
   (float32 safetensors, word-level tokenizer, no chat template), cached under
   bench/_work/eval_models/. Its tokenizer words are the data's most frequent
   tokens, assigned to ids so that the random model's greedy outputs share some
   words with the MeQSum references (weights untouched): otherwise every
   generation metric is 0 and their agreement says nothing.
2. For each task set, runs as child processes, `--repeats` times with the order
   rotating: `medmerge eval`, `lm_eval run` (lm-eval 0.4.13) and, as a third
   runner, lm-eval's Python API making exactly the calls medmerge's runner makes
   (HFLM, a TaskManager without lm-eval's built-in tasks, simple_evaluate): the
   engine cost without either CLI. An untimed warm-up of each CLI (--limit 1)
   comes first. All run the same task YAMLs (medmerge's
   src/medmerge/evaluation/tasks, given to lm_eval with --include_path) on the
   same data (--data-dir / --metadata data_dir), with seed 1234 for
   python/numpy/torch/fewshot, dtype auto, batch size 1, device cpu, no chat
   template, the same max_gen_toks.
3. Compares every metric (and stderr) of medmerge's results.json with lm_eval's
   results_*.json (and the API's); exits 1 if any differs by more than 1e-9 or
   is missing on one side.
4. Times, in one further child process, the steps each CLI adds around the
   engine (medmerge: model header check, NLTK activation, data pre-validation,
   sha256 of the model files; lm_eval CLI: indexing its ~14,000 built-in task
   YAMLs), and, when a ratio exceeds 1.1 (or with --profile), runs medmerge once
   more under cProfile.
5. Prints a markdown table, machine info and the exact commands, and writes
   bench/_work/eval_overhead.json.

    .venv/bin/python bench/eval_overhead.py
    .venv/bin/python bench/eval_overhead.py --hidden 256 --layers 4 --limit 20 --repeats 5 --tasks mm_meqsum --no-api
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import _common  # bench/_common.py (the script's folder is on sys.path)

ROOT, WORK = _common.ROOT, _common.WORK
run_timed, shell, fmt, steal_pct = _common.run_timed, _common.shell, _common.fmt, _common.steal_pct
BIN = Path(sys.executable).parent
TASKS_DIR = ROOT / "src" / "medmerge" / "evaluation" / "tasks"
SEED = 1234
TOL = 1e-9
MODEL_VERSION = 2  # bump when the model recipe changes, to invalidate the cache


# ----------------------------------------------------------------------------- model


def data_words(data_dir: Path, n: int) -> list[str]:
    """The n most frequent tokens (as the tiny tokenizer's Whitespace pre-tokenizer splits them) of MeQSum's
    summaries and questions and MedQA's questions and options, so that a random model's generations share
    words with the references and the generation metrics are not all 0."""
    import re
    from collections import Counter

    from medmerge.evaluation import data

    counts: Counter = Counter()
    split = re.compile(r"\w+|[^\w\s]+")
    for row in data.load_meqsum(data_dir):
        counts.update(split.findall(row["summary"]) * 3)
        counts.update(split.findall(row["chq"]))
    for row in data.load_medqa(data_dir):
        counts.update(split.findall(row["question"] + " " + " ".join(row["options"].values())))
    return [w for w, _ in counts.most_common(n)]


def tune_words(folder: Path, words: list[str], data_dir: Path, docs: int = 20, rounds: int = 3) -> tuple[list[str], float]:
    """Reassign words to token ids (weights untouched) so that the random model's greedy MeQSum outputs share
    words with the references: generate for the first `docs` prompts, give the ids it emits most to the words
    most frequent in the summaries (swaps; specials stay), repeat `rounds` times, keep the best ROUGE-1.
    Without this a random model's outputs and the references share no word and every generation metric is 0,
    which makes "the metrics are identical" vacuous for them."""
    import re
    from collections import Counter

    import torch
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medmerge import tiny
    from medmerge.evaluation import data

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    rows = data.load_meqsum(data_dir)
    prompts = ["Summarize the following consumer health question as one short question.\n\nQuestion:\n"
               f"{r['chq'].strip()}\n\nSummary:" for r in rows[:docs]]
    targets = [r["summary"] for r in rows[:docs]]
    frequent = Counter(w for r in rows for w in re.findall(r"[a-z0-9]+", r["summary"].lower()))
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    scratch = folder / "_tune_tokenizer"
    best, best_score = list(words), -1.0
    for _ in range(rounds + 1):
        tiny.save_tokenizer(scratch, words)
        tok = AutoTokenizer.from_pretrained(str(scratch))
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids = tok(p, return_tensors="pt").input_ids
                outs.append(model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist())
        score = sum(scorer.score(t, " ".join(words[i] for i in o))["rouge1"].fmeasure
                    for t, o in zip(targets, outs)) / len(targets)
        if score > best_score:
            best, best_score = list(words), score
        emitted = [i for i, _ in Counter(i for o in outs for i in set(o)).most_common(40) if i > 3]
        for i, w in zip(emitted, [w for w, _ in frequent.most_common(40) if w in words]):
            j = words.index(w)
            if j > 3 and i != j:
                words[i], words[j] = words[j], words[i]
    shutil.rmtree(scratch, ignore_errors=True)
    return best, best_score * 100


def build_model(hidden: int, layers: int, vocab: int, words: str, data_dir: Path) -> Path:
    """bench/_work/eval_models/llama-h<H>-l<L>-v<V>-<words>, built once."""
    folder = WORK / "eval_models" / f"llama-h{hidden}-l{layers}-v{vocab}-{words}"
    stamp = {"hidden": hidden, "layers": layers, "vocab": vocab, "words": words, "version": MODEL_VERSION}
    marker = folder / ".complete"
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k in stamp} == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    from medmerge import tiny

    t0 = time.perf_counter()
    vocab_words = tiny.tokenizer_words(vocab, extra=data_words(data_dir, vocab) if words == "data" else ())
    tiny.make_model(folder, arch="llama", seed=0, hidden=hidden, layers=layers, vocab=vocab, max_positions=2048,
                    words=vocab_words)
    if words == "data":
        vocab_words, score = tune_words(folder, vocab_words, data_dir)
        tiny.save_tokenizer(folder, vocab_words)
        stamp["tuned_rouge1_first_20"] = round(score, 3)
        print(f"tokenizer words reassigned: ROUGE-1 on the first 20 MeQSum docs {score:.2f}", flush=True)
    marker.write_text(json.dumps(stamp))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"built {folder.relative_to(ROOT)} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
    return folder


# ----------------------------------------------------------------------------- commands


def child_env(threads: int) -> dict:
    env = _common.child_env(threads)
    env.pop("MEDMERGE_DATA", None)  # both tools get the data folder explicitly
    return env


def commands(model: Path, tasks: str, limit: int, max_new_tokens: int, batch_size: int, data_dir: Path,
             out: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "medmerge": [str(BIN / "medmerge"), "eval", str(model), "--tasks", tasks, "--out", str(out["medmerge"]),
                     "--data-dir", str(data_dir), "--limit", str(limit), "--gen-kwargs",
                     f"max_new_tokens={max_new_tokens}", "--batch-size", str(batch_size), "--device", "cpu",
                     "--seed", str(SEED), "--force"],
        # lm_eval's CLI defaults that differ from medmerge's are set explicitly: seed (0,1234,1234,1234 ->
        # 1234 x4), device (cuda:0 -> cpu). dtype=auto is HFLM's default and medmerge's.
        "lm_eval": [str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=auto",
                    "--tasks", tasks, "--include_path", str(TASKS_DIR), "--metadata",
                    json.dumps({"data_dir": str(data_dir)}), "--limit", str(limit), "--device", "cpu",
                    "--batch_size", str(batch_size), "--gen_kwargs", f"max_gen_toks={max_new_tokens}",
                    "--seed", str(SEED), "--output_path", str(out["lm_eval"])],
        "lm_eval_api": [sys.executable, "-c", API, str(model), tasks, str(data_dir), str(limit), str(max_new_tokens),
                        str(batch_size), str(out["lm_eval_api"]), str(TASKS_DIR)],
    }


# lm-eval's Python API with exactly the calls medmerge's runner makes (HFLM, a TaskManager over the task
# folder without lm-eval's built-in tasks, simple_evaluate with the same seeds and bootstrap_iters): the
# engine cost without either CLI, to separate medmerge's own steps from lm_eval CLI's.
API = r"""
import json, os, sys, time
start = time.perf_counter()
model, tasks, data_dir, limit, max_new, batch, out, tasks_dir = sys.argv[1:9]
import logging
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
    logging.getLogger(name).setLevel(logging.ERROR)
lm = HFLM(pretrained=model, device="cpu", batch_size=int(batch), dtype="auto", trust_remote_code=False)
manager = TaskManager(include_path=tasks_dir, include_defaults=False, metadata={"data_dir": data_dir})
raw = simple_evaluate(model=lm, tasks=tasks.split(","), task_manager=manager, limit=int(limit),
                      gen_kwargs={"max_gen_toks": int(max_new)}, apply_chat_template=False,
                      random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
                      bootstrap_iters=1000)
raw.pop("samples", None)
raw["total_evaluation_time_seconds"] = time.perf_counter() - start
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "results_api.json"), "w") as f:
    json.dump(raw, f, default=handle_non_serializable)
""".replace("SEED", str(SEED))




# ----------------------------------------------------------------------------- results


def medmerge_metrics(out: Path) -> tuple[dict, dict, dict]:
    """(metrics, stderr, extra) from OUT/results.json."""
    res = json.loads((out / "results.json").read_text())
    return res["tasks"], res.get("stderr", {}), {"wall_time_s": res.get("wall_time_s"), "samples": res.get("samples")}


def lm_eval_metrics(out: Path) -> tuple[dict, dict, dict]:
    """(metrics, stderr, extra) from the newest results_*.json under OUT, keys as medmerge names them."""
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no results_*.json under {out}")
    raw = json.loads(files[-1].read_text())
    scores: dict = {}
    stderr: dict = {}
    for task, row in raw.get("results", {}).items():
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            if name.endswith("_stderr") or "_stderr," in name:
                stderr.setdefault(task, {})[name.replace("_stderr", "")] = value
            else:
                scores.setdefault(task, {})[name] = value
    extra = {"total_evaluation_time_seconds": float(raw.get("total_evaluation_time_seconds") or "nan"),
             "samples": raw.get("n-samples"), "file": str(files[-1].relative_to(ROOT))}
    return scores, stderr, extra


def compare(a: dict, b: dict) -> dict:
    """Max |a - b| over all (task, metric) of either; missing or None-vs-number entries are listed."""
    diffs, missing = {}, []
    for task in sorted(set(a) | set(b)):
        for metric in sorted(set(a.get(task, {})) | set(b.get(task, {}))):
            x, y = a.get(task, {}).get(metric), b.get(task, {}).get(metric)
            if x is None or y is None:
                if not (x is None and y is None):
                    missing.append(f"{task}/{metric}: medmerge={x} lm_eval={y}")
                continue
            diffs[f"{task}/{metric}"] = abs(float(x) - float(y))
    worst = max(diffs.values(), default=0.0)
    return {"n": len(diffs), "max_abs_diff": worst, "missing": missing,
            "identical": not missing and worst <= TOL and bool(diffs), "diffs": diffs}


# ----------------------------------------------------------------------------- where the time goes

COMPONENTS = r"""
import json, sys, time
t = time.perf_counter
model, tasks, data_dir = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
out = {}
s = t(); import medmerge.cli  # typer + rich: what `medmerge` imports before any command
out["import medmerge.cli"] = t() - s
s = t(); from medmerge.evaluation import nltk_data, registry, runner
from medmerge.io import fingerprint, folders
out["import medmerge.evaluation.runner"] = t() - s
from pathlib import Path
s = t(); path = folders.check_model(model)
out["medmerge: check_model (read safetensors headers)"] = t() - s
s = t(); nltk_data.activate()
out["medmerge: nltk_data.activate"] = t() - s
s = t(); registry.plan_tasks(tasks, [], Path(data_dir))
out["medmerge: plan_tasks (task YAMLs + data pre-validation)"] = t() - s
s = t(); registry.plan_tasks(tasks, [], Path(data_dir))
out["medmerge: plan_tasks again (warm)"] = t() - s
s = t(); fingerprint.files_sha256(fingerprint.model_files(path))
out["medmerge: sha256 of the model files"] = t() - s
s = t(); from lm_eval.tasks import TaskManager
out["import lm_eval.tasks"] = t() - s
meta = {"data_dir": data_dir}
s = t(); TaskManager(include_path=str(registry.TASKS_DIR), include_defaults=False, metadata=meta)
out["TaskManager(include_defaults=False) (medmerge)"] = t() - s
s = t(); TaskManager(include_path=str(registry.TASKS_DIR), include_defaults=True, metadata=meta)
out["TaskManager(include_defaults=True) (lm_eval CLI)"] = t() - s
print(json.dumps({k: round(v, 3) for k, v in out.items()}))
"""


def component_times(model: Path, tasks: str, data_dir: Path, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", COMPONENTS, str(model), tasks, str(data_dir)], env=env, cwd=str(WORK),
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def profile_medmerge(cmd: list[str], env: dict, log: Path) -> list[tuple[str, float]]:
    """One extra medmerge run under cProfile; cumulative seconds of the functions that matter for overhead."""
    prof = log.with_suffix(".prof")
    code = ("import sys, cProfile; from medmerge.cli import app; sys.argv = ['medmerge'] + sys.argv[1:]\n"
            f"cProfile.run('app()', {str(prof)!r})")
    with open(log, "wb") as fh:
        subprocess.run([sys.executable, "-c", code, *cmd[1:]], env=env, cwd=str(WORK), stdout=fh,
                       stderr=subprocess.STDOUT, check=False)
    import pstats

    st = pstats.Stats(str(prof))
    want = ("evaluate", "check_model", "plan_tasks", "file_sha256", "simple_evaluate", "write_results", "activate",
            "__init__", "evaluate")
    rows = []
    for (file, _, fn), (_, _, _, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        if fn in want and ("medmerge" in file or fn == "simple_evaluate" or (fn == "__init__" and "huggingface.py" in file)):
            rows.append((f"{Path(file).name}:{fn}", round(ct, 3)))
    return sorted(set(rows), key=lambda r: -r[1])


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    return _common.machine_info(("torch", "transformers", "lm_eval", "medmerge"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["mm_meqsum,mm_medqa", "mm_medqa"],
                    help="one or more task sets, each comma-separated (one table row per set)")
    ap.add_argument("--limit", type=int, default=50, help="documents per task (mm_medqa has 50)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generation length cap (max_gen_toks)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--words", choices=("data", "synthetic"), default="data",
                    help="tokenizer words: the data's most frequent tokens (default; non-zero ROUGE/BLEU/METEOR) "
                         "or tiny.tokenizer_words' tok<N> placeholders (generation metrics all 0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and task set (order rotates)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MEDMERGE_DATA", "/work/shared/data")))
    ap.add_argument("--no-api", action="store_true",
                    help="skip the third runner, lm-eval's Python API making medmerge's calls (no CLI)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed --limit 1 run of each CLI")
    ap.add_argument("--no-components", action="store_true", help="skip timing the steps each CLI adds")
    ap.add_argument("--profile", action="store_true",
                    help="also run medmerge once under cProfile (always done when medmerge / lm_eval CLI or "
                         "medmerge / lm-eval API exceeds 1.1)")
    ap.add_argument("--timeout", type=float, default=900, help="warn when one run takes longer than this")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    model = build_model(args.hidden, args.layers, args.vocab, args.words, args.data_dir)
    info = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = shell([".venv/bin/python", "bench/eval_overhead.py", *sys.argv[1:]])
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_bytes'] / 2**30:.0f} GiB; python {info['python']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, lm_eval {info['lm_eval']}; medmerge "
          f"{info['medmerge_commit']}{' (src dirty)' if info['medmerge_src_dirty'] else ''}; {started}", flush=True)
    print(f"model: {model.relative_to(ROOT)} (llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"float32, {args.words} words)", flush=True)
    print(f"command: {command}", flush=True)

    tools = ["lm_eval", "medmerge"] + ([] if args.no_api else ["lm_eval_api"])
    readers = {"medmerge": medmerge_metrics, "lm_eval": lm_eval_metrics, "lm_eval_api": lm_eval_metrics}
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": info,
               "started": started, "command": command, "model": str(model.relative_to(ROOT)), "sets": []}
    failed = False
    for tasks in args.tasks:
        name = tasks.replace(",", "+")
        outs = {t: WORK / "eval_out" / name / t for t in ("medmerge", "lm_eval", "lm_eval_api")}
        cmds = commands(model, tasks, args.limit, args.max_new_tokens, args.batch_size, args.data_dir, outs)
        print(f"\n[{tasks}] limit {args.limit}", flush=True)
        for tool in ("lm_eval", "medmerge"):
            print(f"  {tool}: {shell(cmds[tool])}", flush=True)
        if not args.no_warmup:  # page cache: torch, transformers, lm-eval's task YAMLs, WordNet
            warm = commands(model, tasks, 1, args.max_new_tokens, args.batch_size, args.data_dir,
                            {t: WORK / "eval_out" / name / f"warmup-{t}" for t in outs})
            for tool in ("lm_eval", "medmerge"):
                r = run_timed(warm[tool], env, WORK / "eval_logs" / name / f"warmup-{tool}.log", args.timeout)
                print(f"  warm-up {tool} (limit 1): rc={r['rc']} {r['wall_s']:.1f}s", flush=True)
        runs: dict[str, list] = {t: [] for t in tools}
        values: dict[str, list] = {t: [] for t in tools}
        for rep in range(args.repeats):
            k = rep % len(tools)
            for tool in tools[k:] + tools[:k]:
                shutil.rmtree(outs[tool], ignore_errors=True)
                log = WORK / "eval_logs" / name / f"{tool}-{rep}.log"
                r, steal = steal_pct(partial(run_timed, cmds[tool], env, log, args.timeout))
                r.update(steal_pct=steal, repeat=rep, medmerge_commit=_common.git("rev-parse", "--short", "HEAD"),
                         medmerge_src_dirty=bool(_common.git("status", "--porcelain", "--", "src")))
                line = f"  repeat {rep} {tool}: rc={r['rc']} wall={r['wall_s']:.1f}s cpu={r['user_s'] + r['sys_s']:.1f}s"
                if r["rc"] == 0:
                    m, se, extra = readers[tool](outs[tool])
                    r.update(extra)
                    values[tool].append((m, se))
                    own = extra.get("wall_time_s") or extra.get("total_evaluation_time_seconds")
                    line += f" self-reported={own:.1f}s"
                else:
                    failed = True
                    line += f" FAILED (see {r['log']})"
                print(line + f" steal={steal}%", flush=True)
                runs[tool].append(r)
        row: dict = {"tasks": tasks, "limit": args.limit, "runs": runs,
                     "commands": {t: shell(c) for t, c in cmds.items() if t != "lm_eval_api"}}
        ok = {t: [r for r in runs[t] if r["rc"] == 0] for t in tools}
        med = {t: statistics.median(r["wall_s"] for r in ok[t]) if ok[t] else None for t in tools}
        row["median_s"] = med
        if med["medmerge"] and med["lm_eval"]:
            row["ratio"] = med["medmerge"] / med["lm_eval"]
            by_rep = {t: {r["repeat"]: r["wall_s"] for r in ok[t]} for t in tools}
            row["ratio_per_repeat"] = [round(by_rep["medmerge"][i] / by_rep["lm_eval"][i], 3)
                                       for i in range(args.repeats) if i in by_rep["medmerge"] and i in by_rep["lm_eval"]]
        if med.get("lm_eval_api") and med["medmerge"]:
            row["ratio_vs_api"] = med["medmerge"] / med["lm_eval_api"]
        row["self_median_s"] = {
            t: statistics.median(r.get("wall_time_s") or r.get("total_evaluation_time_seconds") for r in ok[t])
            if ok[t] else None for t in tools}
        row["cpu_median_s"] = {t: statistics.median(r["user_s"] + r["sys_s"] for r in ok[t]) if ok[t] else None
                               for t in tools}
        if values["medmerge"] and values["lm_eval"]:
            (mm, mm_se), (le, le_se) = values["medmerge"][-1], values["lm_eval"][-1]
            row["metrics"] = compare(mm, le)
            row["stderr"] = compare(mm_se, le_se)
            if values.get("lm_eval_api"):
                row["metrics_vs_api"] = compare(mm, values["lm_eval_api"][-1][0])
            row["medmerge_values"], row["lm_eval_values"] = mm, le
            row["repeatable"] = {t: all(compare(m, values[t][-1][0])["max_abs_diff"] == 0 and
                                        not compare(m, values[t][-1][0])["missing"] for m, _ in values[t])
                                 for t in tools if values[t]}
            print(f"  metrics: {row['metrics']['n']} compared, max |medmerge - lm_eval| = "
                  f"{row['metrics']['max_abs_diff']:.3g}, identical: {row['metrics']['identical']}; stderr max diff "
                  f"{row['stderr']['max_abs_diff']:.3g}; same values on every repeat: {row['repeatable']}", flush=True)
            for miss in row["metrics"]["missing"] + row["stderr"]["missing"]:
                print(f"    mismatch: {miss}", flush=True)
            if not row["metrics"]["identical"] or not row.get("metrics_vs_api", {"identical": True})["identical"]:
                failed = True
        else:
            failed = True
        if not args.no_components:
            row["components"] = component_times(model, tasks, args.data_dir, env)
        if args.profile or max(row.get("ratio") or 0, row.get("ratio_vs_api") or 0) > 1.1:
            row["profile"] = profile_medmerge(cmds["medmerge"], env, WORK / "eval_logs" / name / "medmerge-profile.log")
        results["sets"].append(row)
        (WORK / "eval_overhead.json").write_text(json.dumps(results, indent=2))

    # ------------------------------------------------------------------ report
    print(f"\n{command}\n{info['cpu']}, {info['cores']} cores; medmerge {info['medmerge_commit']}; {started}; "
          f"model llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.repeats} repeats, medians\n")
    api = "lm_eval_api" in tools
    print("| tasks | limit | lm_eval CLI s | medmerge s | **medmerge / lm_eval CLI** | per repeat |"
          + (" lm-eval API s | medmerge / API |" if api else "")
          + " medmerge wall_time_s | lm_eval total_evaluation_time_seconds | metrics identical (max abs diff) |")
    print("|---|---|---|---|---|---|" + ("---|---|" if api else "") + "---|---|---|")
    for row in results["sets"]:
        if not row.get("ratio"):
            print(f"| {row['tasks']} | {row['limit']} | failed |")
            continue
        med, own, met = row["median_s"], row["self_median_s"], row.get("metrics")
        ident = f"{'yes' if met['identical'] else 'NO'} ({met['max_abs_diff']:.3g}, {met['n']} metrics)" if met else "-"
        print(f"| {row['tasks']} | {row['limit']} | {fmt(med['lm_eval'])} | {fmt(med['medmerge'])} | "
              f"**{row['ratio']:.2f}** | {', '.join(f'{x:.2f}' for x in row['ratio_per_repeat'])} |"
              + (f" {fmt(med.get('lm_eval_api'))} | {fmt(row.get('ratio_vs_api'), 2)} |" if api else "")
              + f" {fmt(own['medmerge'])} | {fmt(own['lm_eval'])} | {ident} |")
    for row in results["sets"]:
        if row.get("medmerge_values"):
            print(f"\n{row['tasks']}: values (medmerge; lm_eval's are compared above):")
            for task, ms in row["medmerge_values"].items():
                print(f"  {task}: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                                for k, v in ms.items()))
        print(f"\n{row['tasks']}: median CPU s (user+sys): {row['cpu_median_s']}")
        if row.get("components"):
            print(f"\n{row['tasks']}: steps timed in-process (s):")
            for k, v in row["components"].items():
                print(f"  {k}: {v}")
        if row.get("profile"):
            print(f"\n{row['tasks']}: medmerge under cProfile (cumulative s):")
            for k, v in row["profile"]:
                print(f"  {k}: {v}")
    print(f"\nresults: {(WORK / 'eval_overhead.json').relative_to(ROOT)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
