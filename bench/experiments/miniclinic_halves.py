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
from medmerge.evaluation.scores import relative_scores, summary_scores
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


def score(r, lo, hi):
    """{if_score, clinical_score} of a row on documents lo..hi-1: its per-document values averaged into a results
    dict, scored by the sweep's own formulas (evaluation.scores)."""
    tasks = {}
    for task, values in r["per_doc"].items():
        keep = [i for i, d in enumerate(values["doc_ids"]) if lo <= d < hi]
        tasks[task] = {k: sum(v[i] for i in keep) / len(keep) for k, v in values.items() if k != "doc_ids"}
    return summary_scores({"tasks": tasks}, SCORES["if_metric"], SCORES["clinical_metrics"])


ref = {r["label"]: r for r in rows if r["kind"] == "reference"}
for lo, hi in ((0, 100), (100, 200), (0, 200)):
    ins, clin = score(ref["instruct"], lo, hi), score(ref["clinical"], lo, hi)
    print(f"documents {lo}-{hi - 1}: instruct IF {ins['if_score']:.1f}, clinical composite {ins['clinical_score']:.1f}; "
          f"clinical model {clin['clinical_score']:.1f}; gain {clin['clinical_score'] - ins['clinical_score']:.1f}")
    for r in rows:
        if r["kind"] != "reference":
            s = score(r, lo, hi)
            rel = relative_scores(s, ins, clin)
            print(f"  {r['label']:<52} IF {s['if_score']:5.1f} ({rel['if_retention_pct']:5.1f}%)  clinical "
                  f"{s['clinical_score']:5.1f} (gain kept {rel['clinical_gain_kept_pct']:5.1f}%)")
