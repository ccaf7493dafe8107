#!/usr/bin/env python
"""Benchmark MedCare stage 1 (routed noise experts) against plain LoRA: training tokens/s, same model and data.

What it does (results: docs/benchmarks.md, "MedCare stage 1 vs plain LoRA"):

1. Model sizes (`--sizes`):
   - `world`: the miniclinic world's instruct model (Llama, hidden 128, 2 layers,
     MLP 384), from `--world` (default bench/_work/miniclinic/full; built there with
     `medmerge miniclinic build` when missing);
   - `small`: a random Llama with the world's tokenizer, hidden 512, 4 layers,
     MLP 1376, 8 heads (about 12 M parameters besides embeddings), cached in bench/_work.
2. Data, identical for every run: `--docs` documents of the world's clinical corpus
   (a seeded k-shot subset, the same for every run), packed into `--seq`-token blocks,
   so that every step trains on exactly batch x seq tokens, with no padding.
3. Runs, as child processes, alternating order, `--repeats` times each:
   - `medmerge medcare stage1` with the paper's modules (attention LoRA r16 on
     q,k,v,o; FFN knowledge aggregator r32 + 8 noise experts r16, top 2);
   - `medmerge train` with plain LoRA r16 / alpha 32 on all seven projections
     (the usual LoRA baseline);
   - `medmerge train` with plain LoRA r32 / alpha 64 on all seven projections, at
     least MedCare's shared ranks (r16 attention, r32 FFN), so that the difference
     to it is the noise experts and their routing rather than the rank;
   - with `--stage2`, also `medmerge medcare stage2` from the first stage-1 run
     (alignment module + the in-forward orthogonality penalty).
   Same steps, batch, sequence length, learning rate, seed, threads; fp32, CPU.
4. Tokens/s is the trainer's own figure from medmerge_train.json (non-padding
   input tokens / wall time of trainer.train()), identical in definition for every
   run; the token counts are printed and must match between runs (same data,
   same sampler seed). CPU steal during each run is recorded (/proc/stat).
5. Prints a markdown table with ratios (MedCare / LoRA) and machine info; writes
   bench/_work/medcare_overhead.json.

    .venv/bin/python bench/medcare_overhead.py
    .venv/bin/python bench/medcare_overhead.py --sizes world --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, child_env, fmt, machine_info, run_timed, shell, steal_pct  # noqa: E402

PY = sys.executable
OUT = WORK / "medcare_overhead"


def world_dir(path: Path, threads: int) -> Path:
    if not (path / "summary.json").is_file():
        print(f"building the full world into {path} (about 11 minutes)", flush=True)
        res = run_timed([PY, "-m", "medmerge.cli", "miniclinic", "build", str(path), "--preset", "full", "-q"],
                        child_env(threads), OUT / "logs" / "world.log", 3600)
        if res["rc"] != 0:
            sys.exit(f"world build failed: see {res['log']}")
    return path


def small_model(world: Path) -> Path:
    folder = WORK / "medcare_small_llama"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(world / "models" / "instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def configs(model: Path, world: Path, args) -> dict[str, tuple[list[str], dict]]:
    """{run name: (command prefix, config dict)}; the command gets CONFIG --out OUT --force -q appended."""
    training = {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "warmup_ratio": 0.0,
                "logging_steps": max(1, args.steps // 4), "save_steps": 10 ** 6, "threads": args.threads,
                "device": "cpu"}
    text = {"path": str(world / "data" / "corpora" / "clinical.txt")}
    common = {"model": str(model), "seed": 0, "max_seq_length": args.seq, "training": training}
    runs = {"medcare-stage1": ([PY, "-m", "medmerge.cli", "medcare", "stage1"],
                               {**common, "data": [{**text, "stage": "pt", "k_shot": args.docs}]})}
    for name, r in (("lora-r16", 16), ("lora-r32", 32)):
        runs[name] = ([PY, "-m", "medmerge.cli", "train"],
                      {"stage": "pt", **common, "data": text, "k_shot": args.docs,
                       "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05}})
    return runs


def adapter_params(out: Path) -> int | None:
    from safetensors import safe_open

    for name in ("medcare_model.safetensors", "adapter_model.safetensors"):
        if (out / name).is_file():
            with safe_open(str(out / name), "pt") as f:
                return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return None


def run_once(name: str, prefix: list[str], config: dict, folder: Path, args) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / f"{name}.yml"
    cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
    out = folder / name
    cmd = [*prefix, str(cfg_file), "--out", str(out), "--force", "-q"]
    res, steal = steal_pct(lambda: run_timed(cmd, child_env(args.threads), folder / f"{name}.log", 3600))
    if res["rc"] != 0:
        sys.exit(f"{name} failed (rc {res['rc']}): see {res['log']}")
    result = json.loads((out / "medmerge_train.json").read_text())["result"]
    return {"name": name, "tokens_per_s": result["tokens_per_s"], "tokens": result["tokens_seen"],
            "train_s": result["seconds"], "wall_s": res["wall_s"], "steal_pct": steal,
            "adapter_params": adapter_params(out), "command": shell(cmd)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=WORK / "miniclinic" / "full")
    ap.add_argument("--sizes", default="world,small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stage2", action="store_true", help="also time stage 2 (alignment module + penalty)")
    ap.add_argument("--json", type=Path, default=WORK / "medcare_overhead.json")
    args = ap.parse_args()

    world = world_dir(args.world, args.threads)
    results = {"machine": machine_info(("torch", "transformers", "peft")), "args": {k: str(v) for k, v in
                                                                                    vars(args).items()},
               "sizes": {}}
    for size in args.sizes.split(","):
        model = world / "models" / "instruct" if size == "world" else small_model(world)
        runs = configs(model, world, args)
        rows: dict[str, list[dict]] = {name: [] for name in runs}
        for rep in range(args.repeats):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                prefix, cfg = runs[name]
                row = run_once(name, prefix, cfg, OUT / size / f"rep{rep}", args)
                rows[name].append(row)
                print(f"  {size} rep {rep} {name}: {row['tokens_per_s']:.0f} tokens/s ({row['tokens']} tokens, "
                      f"{row['train_s']:.1f} s, steal {row['steal_pct']}%)", flush=True)
        if args.stage2:
            s1 = OUT / size / "rep0" / "medcare-stage1"
            cfg2 = {"stage1": str(s1), "data": runs["medcare-stage1"][1]["data"], "seed": 0,
                    "max_seq_length": args.seq, "training": runs["medcare-stage1"][1]["training"]}
            rows["medcare-stage2"] = [run_once("medcare-stage2", [PY, "-m", "medmerge.cli", "medcare", "stage2"],
                                               cfg2, OUT / size / f"rep{rep}", args) for rep in range(args.repeats)]
        summary = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                          "tokens": sorted({r["tokens"] for r in rs}), "adapter_params": rs[0]["adapter_params"],
                          "steal_pct": [r["steal_pct"] for r in rs], "runs": rs}
                   for name, rs in rows.items()}
        results["sizes"][size] = summary
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| model | run | adapter params | tokens / run | tokens/s (median) | MedCare stage 1 / this | steal % |")
    print("|---|---|---|---|---|---|---|")
    for size, summary in results["sizes"].items():
        ref = summary["medcare-stage1"]["tokens_per_s"]
        for name, s in summary.items():
            print(f"| {size} | {name} | {s['adapter_params']:,} | {'/'.join(map(str, s['tokens']))} | "
                  f"{fmt(s['tokens_per_s'], 0)} | {fmt(ref / s['tokens_per_s'], 2)} | "
                  f"{', '.join(fmt(x) for x in s['steal_pct'])} |")
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}; medmerge {m['medmerge_commit']}")
    print("command: " + shell([PY, *sys.argv]))


if __name__ == "__main__":
    main()
