#!/usr/bin/env python
"""Benchmark `medmerge train` (SFT) against a plain TRL `SFTTrainer` script: same model, data and settings.

What it does (see docs/benchmarks.md, "medmerge train vs TRL SFTTrainer", for results):

1. Writes the SFT data once to bench/_work/train_data/ (never into the repository):
   MeQSum (`chq` -> `summary`, 1,000 pairs) and the MedQuAD sample (`question` ->
   `answer`, 500 pairs) as JSONL `{"prompt", "response"}`.
2. Builds (or reuses) a small random Llama with `medmerge.tiny.make_model`
   (float32, word-level tokenizer whose words are the data's most frequent tokens,
   no chat template), cached under bench/_work/train_models/.
3. For each mode (full fine-tuning, LoRA), runs as child processes, `--repeats`
   times with the order alternating: `medmerge train CONFIG.yml --out OUT --force -q`
   and `train_throughput.py trl-sft ...` (the TRL side, a plain SFTTrainer script
   in this file: `trl_main`). Both get the same model folder, data, max length,
   batch size, steps, learning rate, scheduler, warm-up, seed / data seed, logging
   and save interval, fp32, no gradient checkpointing, no packing, no padding-free,
   right padding per batch, loss on the response tokens only, and the same
   threads (OMP_NUM_THREADS and torch.set_num_threads). The tiny tokenizer has no
   chat template, so medmerge renders its plain template, prompt + "\\n" + response
   + EOS; TRL gets the same text as a prompt-completion pair, prompt = prompt +
   "\\n", completion = response (TRL appends EOS). The first TRL run dumps its
   tokenised examples and the script checks that they are exactly medmerge's
   (`medmerge.training.data.build_examples`): input ids and labels.
4. Tokens/s is measured the same way for both: non-padding input tokens the
   Trainer counted (`include_num_input_tokens_seen="non_padding"`, i.e. the sum of
   the attention masks) divided by the wall time of `trainer.train()`. Both
   counts are printed and must be equal (same examples, same sampler seed). The
   whole-process wall time of each child is recorded too.
5. Noise: other sessions may share this machine's cores. Before each timed run
   the script waits (up to `--quiet-wait` s) until other processes use < 0.25
   cores, measures the CPU other processes used during the run (/proc/stat busy
   time minus the child's own user + sys), and discards and repeats (at most
   `--retries` times) a run during which that exceeded `--max-other-load` cores.
6. If medmerge / TRL falls below `--goal` (0.95) in a mode, or with `--profile`,
   runs each tool once more under cProfile in that mode and prints the cumulative
   time of the training-loop parts (forward, LM head and loss, backward,
   optimizer, collator, callbacks, logging, checkpoint) per step, side by side,
   and of the once-per-run parts (tokenisation, model load, loss plot) in total.
7. With `--presets`, also times `medmerge miniclinic build OUT --preset P --seed 0
   --force -q --no-cache` for P in quick and full (`--preset-cache` drops
   --no-cache; MEDMERGE_CACHE points into bench/_work either way), and reads the
   build's own timings from OUT/summary.json. Skipped, with a message, where this
   medmerge has no `miniclinic build` command.
8. Prints markdown tables, machine info and the exact command, and writes
   bench/_work/train_throughput.json (`--json` to write elsewhere).

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --modes lora --steps 20 --repeats 1 --profile
    .venv/bin/python bench/train_throughput.py --no-train --presets
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
run_timed, shell, fmt = _common.run_timed, _common.shell, _common.fmt
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve()
MODEL_VERSION = 1  # bump when the model recipe changes, to invalidate the cache
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # medmerge's default


# ----------------------------------------------------------------------------- the TRL side


def trl_main(argv: list[str]) -> None:
    """A plain TRL SFT script: SFTTrainer + SFTConfig on prompt-completion pairs, completion-only loss.

    Settings that SFTConfig defaults differently from transformers' TrainingArguments
    (and from medmerge) are set explicitly: bf16=False (SFTConfig: True),
    gradient_checkpointing=False (SFTConfig: True). Everything else is what
    medmerge's trainer passes to TrainingArguments for the same config.
    """
    ap = argparse.ArgumentParser(prog="train_throughput.py trl-sft")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="JSONL with prompt and response")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--scheduler", required=True)
    ap.add_argument("--warmup-ratio", type=float, required=True)
    ap.add_argument("--logging-steps", type=int, required=True)
    ap.add_argument("--save-steps", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--dump-examples", default=None, help="write the tokenised examples (after timing) to this JSON")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = Path(a.out)
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": str(r["prompt"]) + "\n", "completion": str(r["response"])} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    peft_config = None
    if a.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(out.with_name(out.name + ".trl-work")), max_length=a.max_length, packing=False,
        padding_free=False, completion_only_loss=True, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type=a.scheduler,
        warmup_steps=a.warmup_ratio, weight_decay=0.0, max_grad_norm=1.0, max_steps=a.steps,
        logging_steps=a.logging_steps, save_steps=a.save_steps, save_total_limit=2, bf16=False,
        gradient_checkpointing=False, use_cpu=True, seed=a.seed, data_seed=a.seed, report_to="none",
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
        save_only_model=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen
    ds = trainer.train_dataset
    ids, labels = ds["input_ids"], ds["labels"]
    record = {"steps": trainer.state.global_step, "train_loss": output.training_loss, "seconds": round(seconds, 2),
              "tokens_seen": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
              "data": {"examples": len(ids), "tokens": sum(len(x) for x in ids),
                       "trained_tokens": sum(sum(1 for t in lab if t != -100) for lab in labels)},
              "optim": str(config.optim)}
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "trl_result.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(config.output_dir, ignore_errors=True)
    if a.dump_examples:
        Path(a.dump_examples).write_text(json.dumps([[list(i), list(lab)] for i, lab in zip(ids, labels)]))
    print(f"trained {record['steps']} steps in {seconds:.1f}s ({tokens} tokens, {record['tokens_per_s']} tokens/s) "
          f"-> {out}", flush=True)


# ----------------------------------------------------------------------------- data and model


def write_data(data_dir: Path) -> tuple[Path, dict]:
    """bench/_work/train_data/sft_meqsum_medquad.jsonl: {"prompt", "response"} from MeQSum and MedQuAD."""
    def jsonl(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]

    meqsum = jsonl(data_dir / "meqsum" / "meqsum.jsonl")
    medquad = jsonl(data_dir / "medquad" / "medquad_sample_500.jsonl")
    rows = [{"prompt": r["chq"].strip(), "response": r["summary"].strip()} for r in meqsum]
    rows += [{"prompt": r["question"].strip(), "response": r["answer"].strip()} for r in medquad]
    path = WORK / "train_data" / "sft_meqsum_medquad.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path, {"meqsum": len(meqsum), "medquad": len(medquad), "pairs": len(rows)}


def data_words(path: Path, n: int) -> list[str]:
    """The data's n most frequent tokens (as the tiny tokenizer's Whitespace pre-tokenizer splits them)."""
    import re
    from collections import Counter

    split = re.compile(r"\w+|[^\w\s]+")
    counts: Counter = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        counts.update(split.findall(r["prompt"] + " " + r["response"]))
    return [w for w, _ in counts.most_common(n)]


def build_model(hidden: int, layers: int, vocab: int, data: Path) -> Path:
    folder = WORK / "train_models" / f"llama-h{hidden}-l{layers}-v{vocab}"
    stamp = {"hidden": hidden, "layers": layers, "vocab": vocab, "version": MODEL_VERSION}
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    from medmerge import tiny

    t0 = time.perf_counter()
    tiny.make_model(folder, arch="llama", seed=0, hidden=hidden, layers=layers, vocab=vocab, max_positions=1024,
                    words=tiny.tokenizer_words(vocab, extra=data_words(data, vocab)))
    marker.write_text(json.dumps(stamp))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"built {folder.relative_to(ROOT)} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
    return folder


def compare_examples(model: Path, data: Path, max_len: int, trl_dump: Path) -> dict:
    """medmerge's tokenised SFT examples (build_examples) vs the ones TRL trained on: ids and labels."""
    from transformers import AutoTokenizer

    from medmerge.training.config import load_config
    from medmerge.training.data import build_examples, read_records

    cfg = load_config(None, raw={"stage": "sft", "model": str(model), "max_seq_length": max_len,
                                 "data": {"path": str(data), "prompt": "prompt", "response": "response"}})
    tok = AutoTokenizer.from_pretrained(str(model))
    mm, stats = build_examples(tok, read_records(cfg.data), cfg)
    trl = json.loads(trl_dump.read_text())
    same = sum(1 for a, b in zip(mm, trl) if a["input_ids"] == b[0] and a["labels"] == b[1])
    first_diff = next((i for i, (a, b) in enumerate(zip(mm, trl)) if a["input_ids"] != b[0] or a["labels"] != b[1]),
                      None)
    out = {"medmerge_examples": len(mm), "trl_examples": len(trl), "identical_examples": same,
           "identical": same == len(mm) == len(trl), "medmerge_stats": stats,
           "trl_tokens": sum(len(x[0]) for x in trl), "trl_trained_tokens": sum(t != -100 for x in trl for t in x[1])}
    if first_diff is not None:
        a, b = mm[first_diff], trl[first_diff]
        out["first_difference"] = {"index": first_diff, "medmerge_len": len(a["input_ids"]), "trl_len": len(b[0]),
                                   "medmerge_tail": tok.decode(a["input_ids"][-8:]), "trl_tail": tok.decode(b[0][-8:])}
    return out


# ----------------------------------------------------------------------------- commands


def medmerge_config(path: Path, model: Path, data: Path, a, lora: bool, steps: int) -> Path:
    from medmerge import tiny

    cfg = {"stage": "sft", "model": str(model), "seed": 0, "max_seq_length": a.max_seq_length,
           "data": {"path": str(data), "prompt": "prompt", "response": "response"},
           "lora": {"r": a.lora_r, "alpha": a.lora_alpha, "dropout": a.lora_dropout, "target_modules": LORA_TARGETS,
                    "rslora": False} if lora else None,
           "training": {"max_steps": steps, "batch_size": a.batch_size, "grad_accum": 1, "lr": a.lr,
                        "scheduler": a.scheduler, "warmup_ratio": a.warmup_ratio, "logging_steps": a.logging_steps,
                        "save_steps": a.save_steps, "threads": a.threads, "device": "cpu"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    return tiny.write_yaml(path, cfg)


def commands(model: Path, data: Path, a, mode: str, steps: int, outs: dict[str, Path], tag: str = "") -> dict:
    lora = mode == "lora"
    config = medmerge_config(WORK / "train_configs" / f"sft-{mode}{tag}.yml", model, data, a, lora, steps)
    trl = [sys.executable, str(HERE), "trl-sft", "--model", str(model), "--data", str(data), "--out",
           str(outs["trl"]), "--max-length", str(a.max_seq_length), "--batch-size", str(a.batch_size),
           "--steps", str(steps), "--lr", str(a.lr), "--scheduler", a.scheduler, "--warmup-ratio",
           str(a.warmup_ratio), "--logging-steps", str(a.logging_steps), "--save-steps", str(a.save_steps),
           "--threads", str(a.threads), "--seed", "0"]
    if lora:
        trl += ["--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--lora-dropout", str(a.lora_dropout)]
    return {"medmerge": [str(BIN / "medmerge"), "train", str(config), "--out", str(outs["medmerge"]), "--force", "-q"],
            "trl": trl}


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat; busy excludes idle, iowait and steal."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def measured(fn) -> tuple[dict, dict]:
    """Run fn() (a run_timed call); CPU steal % and the CPU (in cores) that other processes used meanwhile:
    all busy CPU time from /proc/stat minus the child's own user + sys time, over the wall time. Other
    sessions share this machine's 2 cores, so a run with foreign load is slower for reasons of its own."""
    a = _cpu_jiffies()
    out = fn()
    b = _cpu_jiffies()
    if not a or not b or b[2] == a[2]:
        return out, {"steal_pct": None, "other_cores": None}
    hz = os.sysconf("SC_CLK_TCK")
    other = ((b[0] - a[0]) / hz - out["user_s"] - out["sys_s"]) / max(out["wall_s"], 1e-9)
    return out, {"steal_pct": round(100.0 * (b[1] - a[1]) / (b[2] - a[2]), 1), "other_cores": round(max(other, 0), 2)}


def wait_quiet(limit_s: float, threshold: float = 0.25, sample_s: float = 2.0) -> float:
    """Wait (up to limit_s) until other processes use less than `threshold` cores over `sample_s`; return the
    load last seen (in cores)."""
    deadline = time.monotonic() + limit_s
    hz = os.sysconf("SC_CLK_TCK")
    while True:
        a = _cpu_jiffies()
        time.sleep(sample_s)
        b = _cpu_jiffies()
        load = (b[0] - a[0]) / hz / sample_s if a and b else 0.0
        if load < threshold or time.monotonic() >= deadline:
            if load >= threshold:
                print(f"    note: other processes still use {load:.2f} cores after waiting {limit_s:.0f}s; "
                      "running anyway", flush=True)
            return round(load, 2)
        time.sleep(3)


def read_result(tool: str, out: Path) -> dict:
    if tool == "medmerge":
        rec = json.loads((out / "medmerge_train.json").read_text())
        r = rec["result"]
        return {"tokens_seen": r["tokens_seen"], "train_s": r["seconds"], "tokens_per_s": r["tokens_per_s"],
                "steps": r["steps"], "train_loss": r["train_loss"], "data": rec["data"]}
    rec = json.loads((out / "trl_result.json").read_text())
    return {"tokens_seen": rec["tokens_seen"], "train_s": rec["seconds"], "tokens_per_s": rec["tokens_per_s"],
            "steps": rec["steps"], "train_loss": rec["train_loss"], "data": rec["data"], "optim": rec["optim"]}


# ----------------------------------------------------------------------------- profile

# Runs one tool in-process under cProfile, then reads the cumulative time of the training-loop parts by code
# object (file, first line, name), so that same-named functions (the many `forward`s) are told apart.
PROFILE = r"""
import cProfile, inspect, json, pstats, sys
tool, prof_path, out_json, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rest = sys.argv[5:]
profiler = cProfile.Profile()
if tool == "medmerge":
    from medmerge.cli import app
    sys.argv = ["medmerge"] + rest
    def target():
        try:
            app()
        except SystemExit as e:
            if e.code not in (0, None):
                raise
else:
    sys.path.insert(0, HERE_DIR)
    import train_throughput
    def target():
        train_throughput.trl_main(rest)
profiler.enable()
target()
profiler.disable()
profiler.dump_stats(prof_path)
import torch, accelerate.optimizer, transformers.trainer as T, transformers.trainer_callback as TC
import transformers.modeling_utils as MU, transformers.models.llama.modeling_llama as L, transformers.loss.loss_utils as LU
from transformers.data.data_collator import DataCollatorMixin
parts = [
    ("Trainer.train (timed)", T.Trainer.train),
    ("training_step (forward + loss + backward)", T.Trainer.training_step),
    ("compute_loss (forward + loss)", T.Trainer.compute_loss),
    ("LlamaModel.forward (backbone)", L.LlamaModel.forward),
    ("LlamaForCausalLM.forward (backbone + lm_head + loss)", L.LlamaForCausalLM.forward),
    ("ForCausalLMLoss (cross-entropy)", LU.ForCausalLMLoss),
    ("torch.autograd.backward", torch.autograd.backward),
    ("optimizer.step", accelerate.optimizer.AcceleratedOptimizer.step),
    ("clip_grad_norm_", accelerate.Accelerator.clip_grad_norm_),
    ("lr_scheduler.step", torch.optim.lr_scheduler.LRScheduler.step),
    ("optimizer.zero_grad", accelerate.optimizer.AcceleratedOptimizer.zero_grad),
    ("_track_num_input_tokens", T.Trainer._track_num_input_tokens),
    ("callbacks (CallbackHandler.call_event)", TC.CallbackHandler.call_event),
    ("_maybe_log_save_evaluate (log + checkpoint)", T.Trainer._maybe_log_save_evaluate),
    ("_save_checkpoint", T.Trainer._save_checkpoint),
    ("from_pretrained (model load)", MU.PreTrainedModel.from_pretrained.__func__),
    ("save_pretrained", MU.PreTrainedModel.save_pretrained),
]
if tool == "medmerge":
    import medmerge.training.data as D, medmerge.training.trainer as MT, medmerge.io.fingerprint as F
    parts += [("collator (PadCollator.__call__)", D.PadCollator.__call__),
              ("LogCallback.on_log (train_log.jsonl)", MT.LogCallback.on_log),
              ("tokenisation (build_examples, before train)", D.build_examples),
              ("base fingerprint", F.fingerprint), ("data sha256", F.files_sha256),
              ("loss.png (plot_loss)", MT.plot_loss)]
else:
    import trl.trainer.sft_trainer as S
    parts += [("SFTTrainer.compute_loss", S.SFTTrainer.compute_loss),
              ("collator (DataCollatorMixin.__call__)", DataCollatorMixin.__call__),
              ("SFTTrainer.log (metrics)", S.SFTTrainer.log),
              ("tokenisation (_prepare_dataset, before train)", S.SFTTrainer._prepare_dataset)]
stats = pstats.Stats(prof_path).stats
by_name = {}
for (f, line, name), v in stats.items():
    by_name.setdefault(name, []).append(((f, line, name), v))
def key_of(fn):
    code = inspect.unwrap(fn).__code__
    return (code.co_filename, code.co_firstlineno, code.co_name)
out = {}
for label, fn in parts:
    v = stats.get(key_of(fn))
    if v is not None:
        out[label] = {"cum_s": round(v[3], 3), "calls": v[1]}
for (f, line, n), v in by_name.get("_fused_forward", []):
    if "trl" in f:
        out["TRL _fused_forward (backbone + chunked lm_head/log-probs)"] = {"cum_s": round(v[3], 3), "calls": v[1]}
out = {k: dict(v, ms_per_step=round(1000 * v["cum_s"] / steps, 1)) for k, v in out.items()}
open(out_json, "w").write(json.dumps(out, indent=2))
"""


def profile_run(tool: str, cmd: list[str], env: dict, steps: int, log: Path, quiet_wait: float) -> dict:
    prof, out = log.with_suffix(".prof"), log.with_suffix(".json")
    if quiet_wait > 0:
        wait_quiet(quiet_wait)
    code = PROFILE.replace("HERE_DIR", repr(str(HERE.parent)))
    argv = cmd[1:] if tool == "medmerge" else cmd[3:]  # `train CONFIG ...` / the trl-sft arguments
    r, load = measured(partial(run_timed, [sys.executable, "-c", code, tool, str(prof), str(out), str(steps), *argv],
                               env, log, 1e9))
    if r["rc"] != 0 or not out.is_file():
        return {"error": f"rc={r['rc']}, see {r['log']}"}
    return {"wall_s": r["wall_s"], **load, "parts": json.loads(out.read_text())}


# ----------------------------------------------------------------------------- miniclinic presets


def time_presets(env: dict, presets: list[str], repeats: int, timeout: float, use_cache: bool,
                 quiet_wait: float) -> dict:
    probe = subprocess.run([str(BIN / "medmerge"), "miniclinic", "build", "--help"], env=env, capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()
        msg = ("skipped: this medmerge has no `medmerge miniclinic build` command "
               f"({' '.join(w.strip(' │╭╮╰╯─') for w in why if w.strip(' │╭╮╰╯─'))[:200]})")
        print(f"\n[miniclinic presets] {msg}", flush=True)
        return {"skipped": msg}
    out: dict = {}
    for rep in range(repeats):
        order = presets if rep % 2 == 0 else presets[::-1]
        for p in order:
            dest = WORK / "miniclinic" / p
            cmd = [str(BIN / "medmerge"), "miniclinic", "build", str(dest), "--preset", p, "--seed", "0", "--force",
                   "-q"] + ([] if use_cache else ["--no-cache"])
            before = wait_quiet(quiet_wait) if quiet_wait > 0 else None
            r, load = measured(partial(run_timed, cmd, env, WORK / "train_logs" / f"miniclinic-{p}-{rep}.log",
                                       timeout))
            r.update(load, other_cores_before=before, repeat=rep, command=shell(cmd))
            summary = dest / "summary.json"
            if r["rc"] == 0 and summary.is_file():
                sm = json.loads(summary.read_text())
                r.update(timings_s=sm.get("timings_s"), from_cache=sm.get("from_cache"), threads=sm.get("threads"))
            out.setdefault(p, []).append(r)
            print(f"  miniclinic {p} repeat {rep}: rc={r['rc']} wall={r['wall_s']:.1f}s self-reported "
                  f"{r.get('timings_s')} steal={r['steal_pct']}% other processes={r['other_cores']} cores",
                  flush=True)
    return out


# ----------------------------------------------------------------------------- helpers


def machine_info() -> dict:
    return _common.machine_info(("torch", "transformers", "trl", "peft", "accelerate", "datasets", "medmerge"))


def rel(cmd: list[str]) -> str:
    """A command as the docs show it: repository-relative paths."""
    return shell([c.replace(str(ROOT) + "/", "") for c in cmd])


def run_one(tool: str, mode: str, rep: int, cmd: list[str], out: Path, env: dict, args, dump: bool) -> dict:
    """One timed child run (after waiting for the machine to be quiet), its result file read back."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = list(cmd)
    if tool == "trl" and dump:
        cmd += ["--dump-examples", str(WORK / "train_out" / "trl_examples.json")]
    log = WORK / "train_logs" / f"{mode}-{tool}-{rep}.log"
    before = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
    r, load = measured(partial(run_timed, cmd, env, log, args.timeout))
    r.update(load, other_cores_before=before, repeat=rep, medmerge_commit=_common.git("rev-parse", "--short", "HEAD"),
             medmerge_src_dirty=bool(_common.git("status", "--porcelain", "--", "src")))
    line = f"  repeat {rep} {mode} {tool}: rc={r['rc']} wall={r['wall_s']:.1f}s"
    if r["rc"] == 0:
        r.update(read_result(tool, out))
        line += (f" train()={r['train_s']:.1f}s tokens={r['tokens_seen']} tokens/s={r['tokens_per_s']:.0f} "
                 f"loss={r['train_loss']:.4f}")
    else:
        line += f" FAILED (see {r['log']})"
    print(line + f" steal={r['steal_pct']}% other processes={r['other_cores']} cores", flush=True)
    return r


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    ap.add_argument("--steps", type=int, default=35, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--warmup-ratio", type=float, default=0.03)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--save-steps", type=int, default=500,
                    help="both save a checkpoint at the last step anyway (HF Trainer, save_strategy=steps)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and mode (order alternates)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads and torch.set_num_threads for both")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MEDMERGE_DATA", "/work/shared/data")))
    ap.add_argument("--goal", type=float, default=0.95, help="medmerge / TRL tokens/s to reach")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-step run of each tool")
    ap.add_argument("--profile", action="store_true",
                    help="also run each tool once under cProfile in every mode (done anyway for a mode below --goal)")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--no-train", action="store_true", help="skip the medmerge vs TRL comparison")
    ap.add_argument("--presets", action="store_true",
                    help="also time `medmerge miniclinic build OUT --preset quick|full --seed 0 --force`")
    ap.add_argument("--preset-names", nargs="+", default=["quick", "full"])
    ap.add_argument("--preset-repeats", type=int, default=1)
    ap.add_argument("--preset-cache", action="store_true",
                    help="let `miniclinic build` use its cache (default: --no-cache, i.e. time a real build)")
    ap.add_argument("--max-other-load", type=float, default=0.3,
                    help="a run during which other processes used more CPU than this (cores) is discarded and redone")
    ap.add_argument("--retries", type=int, default=2, help="how often a discarded run is redone")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="before each timed run, wait up to this many seconds for other processes to use < 0.25 "
                         "cores (0: don't wait); the load seen during each run is recorded either way")
    ap.add_argument("--timeout", type=float, default=600, help="warn when one run takes longer than this")
    ap.add_argument("--json", type=Path, default=WORK / "train_throughput.json", help="where the results go")
    if len(sys.argv) > 1 and sys.argv[1] == "trl-sft":
        trl_main(sys.argv[2:])
        return
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    env = _common.child_env(args.threads)
    info = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = shell([".venv/bin/python", "bench/train_throughput.py", *sys.argv[1:]])
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_bytes'] / 2**30:.0f} GiB; python {info['python']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}; "
          f"medmerge {info['medmerge_commit']}{' (src dirty)' if info['medmerge_src_dirty'] else ''}; {started}",
          flush=True)
    print(f"command: {command}", flush=True)
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": info,
                     "started": started, "command": command, "modes": {}}
    failed = False
    if not args.no_train:
        data, counts = write_data(args.data_dir)
        model = build_model(args.hidden, args.layers, args.vocab, data)
        results.update(data=str(data.relative_to(ROOT)), data_counts=counts, model=str(model.relative_to(ROOT)))
        print(f"data: {data.relative_to(ROOT)} ({counts['pairs']} pairs: MeQSum {counts['meqsum']}, MedQuAD "
              f"{counts['medquad']}); model: {model.relative_to(ROOT)} (llama, hidden {args.hidden}, {args.layers} "
              f"layers, vocab {args.vocab}, float32)", flush=True)
        tools = ["trl", "medmerge"]
        if not args.no_warmup:  # page cache: torch, transformers, trl, datasets, the model
            for tool in tools:
                outs = {t: WORK / "train_out" / f"warmup-{t}" for t in tools}
                cmd = commands(model, data, args, "full", 2, outs, "-warmup")[tool]
                r = run_timed(cmd, env, WORK / "train_logs" / f"warmup-{tool}.log", args.timeout)
                print(f"  warm-up {tool} (2 steps): rc={r['rc']} {r['wall_s']:.1f}s", flush=True)
                if r["rc"] != 0:
                    failed = True
        for mode in args.modes:
            outs = {t: WORK / "train_out" / mode / t for t in tools}
            cmds = commands(model, data, args, mode, args.steps, outs)
            results["modes"][mode] = row = {"commands": {t: rel(c) for t, c in cmds.items()}, "runs": {t: [] for t in tools}}
            print(f"\n[{mode}] {args.steps} steps, batch {args.batch_size}, max length {args.max_seq_length}", flush=True)
            for tool in tools:
                print(f"  {tool}: {rel(cmds[tool])}", flush=True)
        dumped = False
        for rep in range(args.repeats):
            for mode in args.modes:
                outs = {t: WORK / "train_out" / mode / t for t in tools}
                cmds = commands(model, data, args, mode, args.steps, outs)
                row = results["modes"][mode]
                for tool in (tools if rep % 2 == 0 else tools[::-1]):
                    for attempt in range(1 + args.retries):
                        r = run_one(tool, mode, rep, cmds[tool], outs[tool], env, args, dump=not dumped)
                        if r["rc"] != 0 or (r["other_cores"] or 0) <= args.max_other_load or attempt == args.retries:
                            break
                        print(f"    discarded: other processes used {r['other_cores']} cores (> --max-other-load "
                              f"{args.max_other_load}); again", flush=True)
                        row.setdefault("discarded", []).append(r)
                    if r["rc"] != 0:
                        failed = True
                    elif tool == "trl" and not dumped:
                        dumped = True
                        results["examples"] = cmp = compare_examples(model, data, args.max_seq_length,
                                                                     WORK / "train_out" / "trl_examples.json")
                        print(f"  tokenised examples: medmerge {cmp['medmerge_examples']}, TRL "
                              f"{cmp['trl_examples']}, identical (ids and labels) {cmp['identical_examples']}"
                              f" -> {'IDENTICAL' if cmp['identical'] else 'DIFFERENT'}; tokens medmerge "
                              f"{cmp['medmerge_stats']['tokens']} / TRL {cmp['trl_tokens']}, trained tokens "
                              f"{cmp['medmerge_stats']['trained_tokens']} / {cmp['trl_trained_tokens']}", flush=True)
                        if not cmp["identical"]:
                            failed = True
                            print(f"    first difference: {cmp.get('first_difference')}", flush=True)
                    row["runs"][tool].append(r)
                args.json.write_text(json.dumps(results, indent=2))
        for mode in args.modes:
            row = results["modes"][mode]
            ok = {t: [r for r in row["runs"][t] if r["rc"] == 0] for t in tools}
            if not all(ok.values()):
                continue
            def med(t: str, k: str, ok=ok) -> float:
                return statistics.median(r[k] for r in ok[t])

            row["median"] = {t: {"tokens_per_s": med(t, "tokens_per_s"), "train_s": med(t, "train_s"),
                                 "wall_s": med(t, "wall_s"), "cpu_s": statistics.median(r["user_s"] + r["sys_s"]
                                                                                         for r in ok[t]),
                                 "other_cores_max": max((r["other_cores"] or 0) for r in ok[t])}
                             for t in tools}
            row["ratio"] = row["median"]["medmerge"]["tokens_per_s"] / row["median"]["trl"]["tokens_per_s"]
            by_rep = {t: {r["repeat"]: r for r in ok[t]} for t in tools}
            row["ratio_per_repeat"] = [round(by_rep["medmerge"][i]["tokens_per_s"] / by_rep["trl"][i]["tokens_per_s"], 3)
                                       for i in range(args.repeats) if i in by_rep["medmerge"] and i in by_rep["trl"]]
            row["wall_ratio"] = row["median"]["medmerge"]["wall_s"] / row["median"]["trl"]["wall_s"]
            row["tokens_seen"] = {t: sorted({r["tokens_seen"] for r in ok[t]}) for t in tools}
            row["same_tokens"] = row["tokens_seen"]["medmerge"] == row["tokens_seen"]["trl"] and \
                len(row["tokens_seen"]["trl"]) == 1
            row["loss"] = {t: [round(r["train_loss"], 4) for r in ok[t]] for t in tools}
            if not row["same_tokens"]:
                print(f"  [{mode}] token counts differ: {row['tokens_seen']}: tokens/s normalises by each tool's own "
                      "count", flush=True)
        # ------------------------------------------------------------------ profile
        for mode in args.modes:
            row = results["modes"][mode]
            if args.no_profile or not row.get("ratio") or (row["ratio"] >= args.goal and not args.profile):
                continue
            print(f"\n[{mode}] profiling each tool once under cProfile ({args.steps} steps)", flush=True)
            outs = {t: WORK / "train_out" / mode / f"profile-{t}" for t in tools}
            cmds = commands(model, data, args, mode, args.steps, outs, "-profile")
            row["profile"] = {t: profile_run(t, cmds[t], env, args.steps, WORK / "train_logs" / f"{mode}-{t}-profile.log",
                                             args.quiet_wait) for t in tools}
            args.json.write_text(json.dumps(results, indent=2))

    if args.presets:
        env_presets = dict(env, MEDMERGE_CACHE=str(WORK / "medmerge_cache"))  # never the user's ~/.cache
        results["presets"] = time_presets(env_presets, args.preset_names, args.preset_repeats, args.timeout,
                                          args.preset_cache, args.quiet_wait)
        if "skipped" not in results["presets"] and any(r["rc"] != 0 for rs in results["presets"].values() for r in rs):
            failed = True
    args.json.write_text(json.dumps(results, indent=2))

    # ------------------------------------------------------------------ report
    print(f"\n{command}\n{info['cpu']}, {info['cores']} cores; medmerge {info['medmerge_commit']}; torch "
          f"{info['torch']}, transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}; {started}")
    if results["modes"]:
        print(f"model llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32; SFT, {args.steps} "
              f"steps x batch {args.batch_size}, max length {args.max_seq_length}, {args.threads} threads; "
              f"{args.repeats} repeats, medians\n")
        print("| mode | TRL tokens/s | medmerge tokens/s | **medmerge / TRL** | per repeat | tokens per run (TRL / medmerge) "
              "| train() s TRL / medmerge | process s TRL / medmerge | process medmerge / TRL | other load, cores (max) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for mode, row in results["modes"].items():
            if not row.get("ratio"):
                print(f"| {mode} | failed |")
                continue
            m = row["median"]
            toks = row["tokens_seen"]
            print(f"| {'full FT' if mode == 'full' else f'LoRA r={args.lora_r}'} | {m['trl']['tokens_per_s']:.0f} | "
                  f"{m['medmerge']['tokens_per_s']:.0f} | **{row['ratio']:.2f}** | "
                  f"{', '.join(f'{x:.2f}' for x in row['ratio_per_repeat'])} | "
                  f"{'/'.join(map(str, toks['trl']))} / {'/'.join(map(str, toks['medmerge']))} | "
                  f"{m['trl']['train_s']:.1f} / {m['medmerge']['train_s']:.1f} | "
                  f"{m['trl']['wall_s']:.1f} / {m['medmerge']['wall_s']:.1f} | {row['wall_ratio']:.2f} | "
                  f"{max(m['trl']['other_cores_max'], m['medmerge']['other_cores_max']):.2f} |")
        ratios = [row["ratio"] for row in results["modes"].values() if row.get("ratio")]
        if ratios:
            met = min(ratios) >= args.goal
            print(f"\ngoal medmerge / TRL >= {args.goal}: {'met' if met else 'NOT met'} "
                  f"({', '.join(f'{m} {r:.2f}' for m, r in zip(results['modes'], ratios))})")
            results["goal_met"] = met
        if results.get("examples"):
            cmp = results["examples"]
            print(f"tokenised examples identical (input ids and labels): {cmp['identical']} "
                  f"({cmp['identical_examples']} of {cmp['medmerge_examples']} / {cmp['trl_examples']}); data tokens "
                  f"{cmp['medmerge_stats']['tokens']}, trained (response) tokens {cmp['medmerge_stats']['trained_tokens']}, "
                  f"truncated {cmp['medmerge_stats']['truncated']}")
        for mode, row in results["modes"].items():
            if row.get("loss"):
                print(f"{mode}: train_loss TRL {row['loss']['trl']}, medmerge {row['loss']['medmerge']}; median CPU s "
                      f"TRL {row['median']['trl']['cpu_s']:.1f}, medmerge {row['median']['medmerge']['cpu_s']:.1f}; "
                      f"runs discarded for other load: {len(row.get('discarded', []))}")
        for mode, row in results["modes"].items():
            if row.get("profile"):
                p = row["profile"]
                print(f"\n{mode}: under cProfile, cumulative time (profiler overhead inflates Python-heavy parts; "
                      f"other load TRL {p['trl'].get('other_cores')}, medmerge {p['medmerge'].get('other_cores')} cores); "
                      f"ms per step for the training-loop parts, total s for the parts that run once or a few times")
                print("| part | TRL | medmerge |\n|---|---|---|")
                labels = list(dict.fromkeys([*p["trl"].get("parts", {}), *p["medmerge"].get("parts", {})]))

                def cell(part: dict | None) -> str:
                    if not part:
                        return "-"
                    if part["calls"] >= args.steps:
                        return f"{part['ms_per_step']:.1f} ms/step"
                    return f"{part['cum_s']:.2f} s ({part['calls']}x)"

                for k in labels:
                    cells = [cell(p[t].get("parts", {}).get(k)) for t in ("trl", "medmerge")]
                    print(f"| {k} | {cells[0]} | {cells[1]} |")
                for t in tools:
                    if p[t].get("error"):
                        print(f"{t}: profile failed: {p[t]['error']}")
    if results.get("presets"):
        pr = results["presets"]
        if "skipped" in pr:
            print(f"\nminiclinic presets: {pr['skipped']}")
        else:
            print("\n| miniclinic preset | process wall s (median) | runs | self-reported s (last run) | other load, "
                  "cores (max) | command |\n|---|---|---|---|---|---|")
            for p, rs in pr.items():
                okr = [r["wall_s"] for r in rs if r["rc"] == 0]
                own = rs[-1].get("timings_s") or {}
                print(f"| {p} | {fmt(statistics.median(okr)) if okr else 'failed'} | "
                      f"{', '.join(fmt(r['wall_s']) for r in rs)} | {', '.join(f'{k} {v}' for k, v in own.items())} | "
                      f"{max((r['other_cores'] or 0) for r in rs):.2f} | "
                      f"`{rs[0]['command'].replace(str(ROOT) + '/', '').replace(str(BIN) + '/', '.venv/bin/')}` |")
    print(f"\nresults: {args.json}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
