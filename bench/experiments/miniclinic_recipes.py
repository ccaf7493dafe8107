"""Recipe experiments for the miniclinic world (issue 16): cached training stages, then a small in-memory sweep.

Usage: THREADS=2 .venv/bin/python bench/experiments/miniclinic_recipes.py RECIPE_JSON NAME
e.g. '{"ft": false, "base": {"formatted": 8000}, "instruct": {"steps": 1000}}' e5.
Writes under /tmp/exp (stages are reused across recipes). Prints the task-vector norms, the references and
each merge's IF retention and clinical gain kept. Results so far: docs/miniclinic.md, "Recipe experiments".
"""
import dataclasses, hashlib, json, os, shutil, sys, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch
THREADS = int(os.environ.get("THREADS", "2")); torch.set_num_threads(THREADS)
from medmerge.miniclinic import build as B, world
from medmerge.training.config import load_config
from medmerge.training.trainer import train
import yaml

ROOT = Path(os.environ.get("EXP_ROOT", "/tmp/exp"))
R = json.loads(sys.argv[1])  # recipe overrides
name = sys.argv[2]
preset = R.get("preset", "full")
spec = dataclasses.replace(world.PRESETS[preset], **R.get("world", {}))
wkey = hashlib.sha256(repr(spec).encode()).hexdigest()[:10]
wdir = ROOT / f"world-{wkey}"
if not (wdir / "data" / "world.json").is_file():
    shutil.rmtree(wdir, ignore_errors=True)
    world.generate(wdir, spec)
d = wdir / "data"
s = B.SCHEDULES[preset]
def stage_dir(tag, params):
    h = hashlib.sha256((wkey + tag + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:10]
    return ROOT / "m" / f"{tag}-{h}"
def run(tag, stage, parent, data, p, extra=None):
    out = stage_dir(tag, {"parent": str(parent), "data": data, **p, **(extra or {})})
    if (out / "config.json").is_file():
        return out
    raw = {"stage": stage, "model": str(parent), "data": data, "seed": 0, "max_seq_length": s.seq_len,
           "training": {"max_steps": p["steps"], "batch_size": p.get("batch", s.batch), "lr": p["lr"], "scheduler": "cosine",
                        "warmup_ratio": 0.05, "logging_steps": max(1, p["steps"] // 20), "save_steps": 10 ** 9,
                        "threads": THREADS, "device": "cpu", "weight_decay": p.get("wd", 0.0)}, **(extra or {})}
    t0 = time.time()
    res = train(load_config(None, raw=raw), out, force=True, progress=False)
    print(f"  trained {tag}: {res.steps} steps loss {res.train_loss:.3f} {time.time()-t0:.0f}s", flush=True)
    return out
init = ROOT / f"init-{wkey}"
if not (init / "config.json").is_file():
    B._init_model(init, d / "tokenizer", s, 0)
bp = {"steps": s.base_steps, "lr": s.base_lr, "share": s.base_clinical_share, **R.get("base", {})}
gen, clin = d / "corpora" / "general.txt", d / "corpora" / "clinical.txt"
def instruction_builder(stream: str, clinical_fraction: float):
    """The world's instruction-data builder on a stream of its own (for extra documents, not the SFT data)."""
    import random
    from medmerge.miniclinic import instructions, knowledge, lexicon, tokenizer as tokmod
    kb = knowledge.build(spec.n_conditions, spec.seed, {w.lower() for w in lexicon.words()})
    rng = random.Random(stream)
    return instructions.Builder(kb, rng, tokmod.count_pieces, spec.max_response_tokens, clinical_fraction), rng
if R.get("gen_requests"):  # general text that also holds request-and-reply documents on general topics (no clinical
    # subject, no fact), newlines as spaces: the everyday words instructions use, for base and the clinical replay
    g2 = ROOT / f"gen-{wkey}-r{R['gen_requests']}.txt"
    if not g2.is_file():
        b, rng = instruction_builder("general-requests", 0.0)
        held_out = {json.loads(l)["prompt"] for l in open(d / "eval" / "if.jsonl") if l.strip()}
        docs = []
        while len(docs) < R["gen_requests"]:
            ex = b.example(rng.choice((0, 1, 2)))
            if ex.prompt not in held_out:
                docs.append((ex.prompt + " " + ex.response).replace("\n", " "))
        g2.write_text(gen.read_text(encoding="utf-8") + "\n".join(docs) + "\n", encoding="utf-8")
    gen = g2
def mixed(name, parts, seed):  # a cached mixed-text corpus (build._mixed_text)
    path = ROOT / name
    return path if path.is_file() else B._mixed_text(parts, path, seed)
bt = mixed(f"bt-{wkey}-{bp['share']}-{gen.stem}.txt", [(gen, 1 - bp["share"]), (clin, bp["share"])], 0)
bdata = {"path": str(bt)}
if bp.get("formatted"):
    fj = ROOT / f"bt-{wkey}-{bp['share']}-f{bp['formatted']}.jsonl"
    if not fj.is_file():
        b, rng = instruction_builder("formatted", bp.get("fclin", 0.0))
        docs = [b.example(rng.choice((1, 1, 2))).response for _ in range(bp["formatted"])]
        lines = [l for l in bt.read_text().splitlines() if l.strip()] + docs
        rng.shuffle(lines)
        with open(fj, "w") as f:
            for l in lines:
                f.write(json.dumps({"text": l}) + "\n")
    bdata = {"path": str(fj), "format": "jsonl", "text": "text"}
base = run("base", "pt", init, bdata, bp)
ip = {"steps": s.instruct_steps, "lr": s.instruct_lr, **R.get("instruct", {})}
sft_path = d / "sft" / "instructions.jsonl"
if R.get("cont"):  # document-continuation SFT examples over general text (prefix -> next 1-2 sentences)
    import random, re
    from medmerge.miniclinic import corpora
    sj = ROOT / f"sft-{wkey}-c{R['cont']}.jsonl"
    if not sj.is_file():
        rng = random.Random("continuation")
        rows = [json.loads(l) for l in open(sft_path) if l.strip()]
        rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
        n = round(len(rows) * R["cont"])
        while n:
            sents = re.split(r"(?<=[.!?]) ", corpora.general_document(rng))
            if len(sents) < 3:
                continue
            k = rng.randint(2, len(sents) - 1)
            m = rng.choice((1, 1, 2))
            rows.append({"prompt": " ".join(sents[:k]), "response": " ".join(sents[k:k + m])})
            n -= 1
        rng.shuffle(rows)
        with open(sj, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    sft_path = sj
instruct = run("instruct", "sft", base, {"path": str(sft_path)}, ip, R.get("instruct_extra"))
cp = {"steps": s.clinical_steps, "lr": s.clinical_lr, "replay": 0.5, **R.get("clinical", {})}
ct = mixed(f"ct-{wkey}-{cp['replay']}-{gen.stem}.txt", [(clin, 1 - cp["replay"]), (gen, cp["replay"])], 1)
clinical = run("clinical", "pt", base, {"path": str(ct)}, cp, R.get("clinical_extra"))
models = {"base": str(base), "instruct": str(instruct), "clinical": str(clinical)}
if R.get("ft", True):
    fp = {"steps": s.ft_steps, "lr": s.ft_lr, **R.get("ftp", {})}
    models["instruct_ft"] = str(run("instruct_ft", "sft", instruct, {"path": str(d / "tasks" / "gen_train.jsonl"),
                            "prompt_template": world.GEN_PROMPT, "response": "impression"}, fp))
from medmerge.merging.deltas import task_vectors
tv = task_vectors(base, {"instruct": instruct, "clinical": clinical})
print("deltas", {m: {g: round(v[g]["relative_norm"], 3) for g in ("non_embedding", "embedding")} for m, v in tv["models"].items()},
      "cos", {g: (None if tv["cosines"][0][g] is None else round(tv["cosines"][0][g], 3)) for g in ("non_embedding", "embedding")}, flush=True)
from medmerge.evaluation.compare import fmt_with_ci
from medmerge.experiments import demo
from medmerge.experiments.sweep.run import run as run_sweep
def ta(i, c):
    ms = [{"model": "instruct", "parameters": {"weight": i}}] + ([{"model": "clinical", "parameters": {"weight": c}}] if c else [])
    return {"config": {"merge_method": "task_arithmetic", "base_model": "base", "models": ms}, "label": f"TA_i={i}_c={c}"}
DIAG = [ta(0.9, 0), ta(0.7, 0), ta(1.0, 0.3), ta(1.0, 0.5), ta(1.0, 0.7), ta(1.0, 1.0)]
grid = DIAG + R.get("grid", [{"method": "linear", "t": [0.1, 0.2, 0.3, 0.4, 0.5]}, {"method": "ties", "t": [0.3, 0.5], "density": [0.5]}])
cfg = {"models": models, "references": list(models), "grid": grid,
       "eval": demo._eval_section(wdir, R.get("limit", 100)), "scores": demo.SCORES,
       "select": {"if_retention_min": 90, "maximize": "clinical"}, "seed": 0, "device": "cpu"}
sd = ROOT / "sweeps" / name
shutil.rmtree(sd, ignore_errors=True); sd.parent.mkdir(exist_ok=True, parents=True)
(ROOT / f"{name}.yml").write_text(yaml.safe_dump(cfg))
t0 = time.time()
summ = run_sweep(ROOT / f"{name}.yml", sd, progress=False)
refs = summ["references"]
print(f"sweep {time.time()-t0:.0f}s")
def comp(r):
    t = r.get("tasks", {})
    return f"mcq {100*t.get('mm_miniclinic_mcq', {}).get('acc', float('nan')):5.1f} rougeL {t.get('mm_miniclinic_gen', {}).get('rougeL', float('nan')):5.1f}"
rows = [json.loads(l) for l in open(sd / "sweep.jsonl") if l.strip()]
by_label = {p["label"]: p for p in rows}
for n, r in refs.items():
    print(f"  ref {n:12s} IF {r['if_score']:5.1f} clin {r['clinical_score']:5.1f}", comp(by_label.get(n, r)))
for p in rows:  # retention and gain kept as the sweep computed them (evaluation.scores), with their intervals
    if p["kind"] != "reference":
        print(f"  {p['label']:32s} IF {p['if_score']:5.1f} ({fmt_with_ci(p['if_retention_pct'], p.get('if_retention_ci'))}%) "
              f"clin {p['clinical_score']:5.1f} (gain kept {fmt_with_ci(p['clinical_gain_kept_pct'], p.get('clinical_gain_kept_ci'))}%)",
              comp(p))
print("gain", round(refs["clinical"]["clinical_score"] - refs["instruct"]["clinical_score"], 1))
