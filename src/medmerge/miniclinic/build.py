"""`medmerge miniclinic build OUT`: the synthetic clinical world and its four tiny models, trained here.

The recipe, top to bottom:

1. generate the world's data and tokenizer (`world.generate`);
2. initialise a tiny Llama (hidden 128, 2 layers, tied embeddings) from the seed;
3. `base`        = init + pt on general text with some clinical text mixed in;
4. `instruct`    = base + sft on the IFEval-style instruction data;
5. `clinical`    = base + pt on clinical text with general replay (the GatorTronLlama analogue);
6. `instruct_ft` = instruct + sft on findings -> impression (the forgetting case);
7. evaluate all four on mm_miniclinic_if / _mcq / _gen and write `summary.json`.

Every model is trained by `medmerge.training.trainer.train`, the same trainer users run.
All four descend from one base, so they can be merged. A finished build is cached
by (preset, seed, code version) and copied from the cache the next time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

from ..errors import MedmergeError
from ..evaluation.runner import evaluate
from ..io.writer import atomic_output_dir, check_output
from ..merging.deltas import REAL_LLM_RELATIVE_NORM, fmt_cos, fmt_pct, task_vectors
from ..runtime import cache_root
from ..training.config import load_config
from ..training.trainer import train
from . import world
from .world import TASKS_DIR

MODELS = ("base", "instruct", "clinical", "instruct_ft")


@dataclass(frozen=True)
class Schedule:
    """Model size and training steps of a preset (the data sizes are world.PRESETS)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    seq_len: int = 128
    batch: int = 32
    base_steps: int = 1000
    base_lr: float = 3e-3
    base_clinical_share: float = 0.1
    instruct_steps: int = 400
    instruct_lr: float = 1e-3
    clinical_steps: int = 400
    clinical_lr: float = 5e-4
    ft_steps: int = 300
    ft_lr: float = 2e-3
    # instruct and clinical keep the embedding rows of tokens their data never shows (trainer option
    # freeze_unseen_tokens): under Adam at these learning rates the softmax's push-down gradient on unseen rows
    # becomes a full-size step, so each fine-tune would rewrite the other's tokens (docs/miniclinic.md, f3)
    freeze_unseen_tokens: bool = True
    eval_limit: Optional[int] = None
    eval_max_new_tokens: int = 48
    threads: int = 2


SCHEDULES = {
    # clinical facts need a longer, hotter clinical stage than the feasibility study's 400 @ 5e-4 on this
    # world (a helper measured held-out MCQ 0.66 after 500 steps @ 3e-3 on clinical text alone)
    # quick: the full recipe at half the batch and fewer steps; 600 SFT steps lift instruct's IF to 0.44 on 50
    # prompts (150 gave 0.04), and the clinical stage then gains 20 points (docs/miniclinic.md, recipe q1)
    "quick": Schedule(base_steps=500, instruct_steps=600, clinical_steps=300, clinical_lr=2e-3, ft_steps=100,
                      batch=16, eval_limit=50),
    # 1000 SFT steps lift instruct's IF over 0.5 (400 gave 0.30); instruct_ft needs fewer steps to forget
    "full": Schedule(instruct_steps=1000, clinical_steps=500, clinical_lr=2e-3, ft_steps=200),
}


def code_version() -> str:
    """Hash of the sources that decide what a build produces."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(version("medmerge").encode())
    for folder in ("miniclinic", "training"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and path.is_file():
                h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _mixed_text(parts: list[tuple[Path, float]], out: Path, seed: int) -> Path:
    """A shuffled text file mixing sources by share of lines (one document per line).

    The first source is used once in full; the others are sampled (with
    replacement only when they are too small) to their share of the total.
    """
    rng = random.Random(seed)
    pools = [[line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()] for p, _ in parts]
    total = round(len(pools[0]) / parts[0][1])
    lines = list(pools[0])
    for pool, (_, share) in zip(pools[1:], parts[1:]):
        k = round(total * share)
        lines += rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]
    rng.shuffle(lines)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _init_model(folder: Path, tokenizer_dir: Path, s: Schedule, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # deferred: seconds to import

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.heads, intermediate_size=s.intermediate, max_position_embeddings=max(512, 2 * s.seq_len),
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def _train(name: str, stage: str, model: Path, data: dict, steps: int, lr: float, s: Schedule, out: Path,
           seed: int, progress: bool, freeze_unseen_tokens: bool = False) -> dict:
    raw = {
        "stage": stage, "model": str(model), "data": data, "seed": seed, "max_seq_length": s.seq_len,
        "freeze_unseen_tokens": freeze_unseen_tokens,
        "training": {"max_steps": steps, "batch_size": s.batch, "lr": lr, "scheduler": "cosine",
                     "warmup_ratio": 0.05, "logging_steps": max(1, steps // 20), "save_steps": 10 ** 9,
                     "threads": s.threads, "device": "cpu"},
    }
    res = train(load_config(None, raw=raw), out, force=True, progress=progress)
    return {"model": name, "stage": stage, "from": model.name, "steps": res.steps, "loss": res.train_loss,
            "seconds": round(res.seconds, 1), "tokens_per_s": res.tokens_per_second}


def evaluate_models(out: Path, s: Schedule, models=MODELS, progress: bool = True) -> dict:
    scores = {}
    for name in models:
        res = evaluate(out / "models" / name, ["mm_miniclinic_if", "mm_miniclinic_mcq", "mm_miniclinic_gen"],
                       out / "eval" / name, include_paths=[TASKS_DIR], data_dir=out / "data", limit=s.eval_limit,
                       batch_size=32, device="cpu", gen_kwargs=f"max_new_tokens={s.eval_max_new_tokens}", force=True)
        t = res["tasks"]
        scores[name] = {
            "if_prompt_strict": t["mm_miniclinic_if"]["prompt_level_strict_acc"],
            "if_inst_strict": t["mm_miniclinic_if"]["inst_level_strict_acc"],
            "mcq_acc": t["mm_miniclinic_mcq"]["acc"],
            "gen_rougeL": t["mm_miniclinic_gen"]["rougeL"],
            "gen_bleu": t["mm_miniclinic_gen"]["bleu"],
        }
    return scores


def measure_deltas(models: Path, init: Path) -> dict:
    """Each model's move from its parent (relative norms, non-embedding and embedding apart) and the cosine
    between the instruct and clinical task vectors: the regime that decides whether merges can work."""
    parents = {"base": init, "instruct": models / "base", "clinical": models / "base", "instruct_ft": models / "instruct"}
    fine_tunes = task_vectors(models / "base", {"instruct": models / "instruct", "clinical": models / "clinical"})
    rows = {"base": task_vectors(init, {"base": models / "base"})["models"]["base"],
            **fine_tunes["models"],
            "instruct_ft": task_vectors(models / "instruct", {"instruct_ft": models / "instruct_ft"})["models"]["instruct_ft"]}
    out = {name: {"parent": parents[name].name, **{g: rows[name][g]["relative_norm"] for g in ("non_embedding", "embedding")}}
           for name in MODELS}
    (cos,) = fine_tunes["cosines"]
    return {"relative_norm": out, "cosine_instruct_clinical": {g: cos[g] for g in ("non_embedding", "embedding", "all")},
            "real_llm_relative_norm": REAL_LLM_RELATIVE_NORM}


def render_deltas(deltas: dict) -> str:
    lines = ["| model | parent | non-embedding delta | embedding delta |", "|---|---|---|---|"]
    for name, row in deltas["relative_norm"].items():
        lines.append(f"| {name} | {row['parent']} | {fmt_pct(row['non_embedding'])} | {fmt_pct(row['embedding'])} |")
    c = deltas["cosine_instruct_clinical"]
    lines += ["", f"Cosine between the instruct and clinical task vectors: {fmt_cos(c['non_embedding'])} (non-embedding), "
              f"{fmt_cos(c['embedding'])} (embedding). A real LLM fine-tune moves its non-embedding weights by about "
              f"{fmt_pct(deltas['real_llm_relative_norm'])}."]
    return "\n".join(lines)


def render_table(summary: dict) -> str:
    lines = ["| model | IF prompt-level strict | IF instruction-level strict | clinical MCQ acc "
             "| findings->impression ROUGE-L | BLEU-4 |", "|---|---|---|---|---|---|"]
    for name, sc in summary["scores"].items():
        lines.append(f"| {name} | {sc['if_prompt_strict']:.3f} | {sc['if_inst_strict']:.3f} | {sc['mcq_acc']:.3f} | "
                     f"{sc['gen_rougeL']:.1f} | {sc.get('gen_bleu', float('nan')):.1f} |")
    return "\n".join(lines)


def build(out: str | Path, preset: str = "quick", seed: int = 0, *, force: bool = False, progress: bool = True,
          use_cache: bool = True) -> dict:
    """Build the world into OUT; return the summary (scores, timings, sizes)."""
    if preset not in SCHEDULES:
        raise MedmergeError(f"unknown preset {preset!r}; use quick or full")
    out = Path(out).absolute()
    check_output(out, force)
    key = f"{preset}-s{seed}-{code_version()}"
    cached = cache_root() / "miniclinic" / key
    if use_cache and (cached / "summary.json").is_file():
        with atomic_output_dir(out, force=force) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
        summary = json.loads((out / "summary.json").read_text())
        summary["from_cache"] = str(cached)
        return summary
    s = SCHEDULES[preset]
    torch.set_num_threads(s.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with atomic_output_dir(out, force=force) as tmp:
        t0 = time.perf_counter()
        spec = dataclasses.replace(world.PRESETS[preset], seed=seed)
        info = world.generate(tmp, spec)
        timings["generate"] = round(time.perf_counter() - t0, 1)
        d = tmp / "data"
        work = tmp / "work"
        work.mkdir()
        models = tmp / "models"
        runs = []
        t0 = time.perf_counter()
        init = _init_model(work / "init", d / "tokenizer", s, seed)
        general, clinical = d / "corpora" / "general.txt", d / "corpora" / "clinical.txt"
        base_text = _mixed_text([(general, 1 - s.base_clinical_share), (clinical, s.base_clinical_share)],
                                work / "base_text.txt", seed)
        clin_text = _mixed_text([(clinical, 0.5), (general, 0.5)], work / "clinical_text.txt", seed + 1)
        runs.append(_train("base", "pt", init, {"path": str(base_text)}, s.base_steps, s.base_lr, s,
                           models / "base", seed, progress))
        runs.append(_train("instruct", "sft", models / "base", {"path": str(d / "sft" / "instructions.jsonl")},
                           s.instruct_steps, s.instruct_lr, s, models / "instruct", seed, progress,
                           s.freeze_unseen_tokens))
        runs.append(_train("clinical", "pt", models / "base", {"path": str(clin_text)}, s.clinical_steps,
                           s.clinical_lr, s, models / "clinical", seed, progress, s.freeze_unseen_tokens))
        runs.append(_train("instruct_ft", "sft", models / "instruct",
                           {"path": str(d / "tasks" / "gen_train.jsonl"), "prompt_template": world.GEN_PROMPT,
                            "response": "impression"},
                           s.ft_steps, s.ft_lr, s, models / "instruct_ft", seed, progress))
        timings["train"] = round(time.perf_counter() - t0, 1)
        deltas = measure_deltas(models, init)
        shutil.rmtree(work)
        t0 = time.perf_counter()
        scores = evaluate_models(tmp, s, progress=progress)
        timings["evaluate"] = round(time.perf_counter() - t0, 1)
        timings["total"] = round(time.perf_counter() - started, 1)
        summary = {
            "preset": preset, "seed": seed, "code_version": code_version(), "schedule": asdict(s),
            "world": info, "training": runs, "scores": scores, "task_vectors": deltas, "timings_s": timings,
            "threads": s.threads,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "summary.md").write_text(render_table(summary) + "\n\n" + render_deltas(deltas) + "\n")
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(out, partial)
        shutil.rmtree(cached, ignore_errors=True)
        partial.rename(cached)
    return summary
