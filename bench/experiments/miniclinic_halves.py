"""Out-of-sample check of the demo's merge settings (issue 16): score them on all 200 documents of each task and
split the per-document values at 100, so the first half is what the demo (limit 100) saw and chose the grid on,
and the second half is what no choice saw.

Usage: .venv/bin/python bench/experiments/miniclinic_halves.py WORLD OUT
WORLD is a built full world (a demo's `OUT/world`). Prints IF retention and clinical gain kept (the sweep's
formulas, evaluation.scores) per half and over all 200. Results: docs/miniclinic.md, "What the full preset shows".
"""
import os, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import yaml
from medmerge.experiments.demo import SCORES, sweep_config
from medmerge.experiments.sweep.run import run as run_sweep
from medmerge.io.records import read_jsonl

world, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = sweep_config(world, 200, 0)
cfg["grid"] = [{"method": "task_arithmetic", "t": [0.3, 0.35, 0.4], "lambda": [1.5, 1.8]},
               {"method": "ties", "t": [0.3, 0.35, 0.4], "density": [0.9], "lambda": [1.8], "normalize": [False]},
               {"method": "linear", "t": [0.1, 0.3]}]
out.mkdir(parents=True, exist_ok=True)
(out / "halves.yml").write_text(yaml.safe_dump(cfg))
run_sweep(out / "halves.yml", out / "sweep", progress=False)
rows = read_jsonl(out / "sweep" / "sweep.jsonl")
if_task, if_key = SCORES["if_metric"].split("/")


def score(r, lo, hi):
    """(IF, clinical composite) of a row on documents lo..hi-1, from its per-document values."""
    def mean(task, key):
        v = [x for i, x in zip(r["per_doc"][task]["doc_ids"], r["per_doc"][task][key]) if lo <= i < hi]
        return sum(v) / len(v)
    parts = []
    for metric in SCORES["clinical_metrics"]:
        task, key = metric.split("/")
        parts.append(mean(task, key) * (100 if key == "acc" else 1))  # accuracies x 100, ROUGE already 0-100
    return 100 * mean(if_task, if_key), sum(parts) / len(parts)


ref = {r["label"]: r for r in rows if r["kind"] == "reference"}
for lo, hi in ((0, 100), (100, 200), (0, 200)):
    i_if, i_c = score(ref["instruct"], lo, hi)
    c_c = score(ref["clinical"], lo, hi)[1]
    print(f"documents {lo}-{hi - 1}: instruct IF {i_if:.1f}, clinical composite {i_c:.1f}; clinical model {c_c:.1f}; "
          f"gain {c_c - i_c:.1f}")
    for r in rows:
        if r["kind"] != "reference":
            f, c = score(r, lo, hi)
            print(f"  {r['label']:<52} IF {f:5.1f} ({100 * f / i_if:5.1f}%)  clinical {c:5.1f} "
                  f"(gain kept {100 * (c - i_c) / (c_c - i_c):5.1f}%)")
