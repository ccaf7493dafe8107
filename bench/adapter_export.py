#!/usr/bin/env python
"""Benchmark: exact full export of a weighted two-adapter merge, medmerge against the PEFT route.

The PEFT route is what users write: load the base, load both adapters,
`add_weighted_adapter(..., combination_type="cat")`, `merge_and_unload()`,
`save_pretrained()`. medmerge is `medmerge adapters merge --base B --adapter
pt:0.3 --adapter sft:0.7 --out O`: streamed; before the output is moved into place
every tensor is read back (CRC-32) and a sample of modules recomputed. `--verify-all`
(every module recomputed) and `--no-verify` are timed too.

Setup (cached under bench/_work/adapter_export/): a random Llama of about 0.55 B
parameters in bfloat16 (hidden 1536, 16 layers, MLP 4096, vocabulary 32,000,
untied) and two LoRA adapters (r 16 and r 32, alpha 32, all seven linear
projections of every layer) with random factors.

Every run is a child process (2 threads); the script records wall time and
peak RSS (ru_maxrss from wait4; this script never loads a model itself, since a
child inherits its parent's peak RSS), alternates the order over `--repeats`, and prints
the medians and the ratios PEFT / medmerge. It also checks both outputs with
`medmerge verify --base --adapter` (the largest deviation from
W0 + 0.3 dW_PT + 0.7 dW_SFT, computed in float32 and rounded once).

    .venv/bin/python bench/adapter_export.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

WORK = _common.WORK / "adapter_export"
PY = sys.executable


def setup() -> tuple[Path, Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    base, pt, sft = WORK / "base", WORK / "pt", WORK / "sft"
    if (sft / "adapter_model.safetensors").is_file():
        return base, pt, sft
    WORK.mkdir(parents=True, exist_ok=True)
    print("building the 0.55B base and two adapters (once)...", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1536, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, intermediate_size=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    print(f"  {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters", flush=True)
    model.save_pretrained(str(base), safe_serialization=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for path, r, seed in ((pt, 16, 1), (sft, 32, 2)):
        m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        pm = get_peft_model(m, LoraConfig(r=r, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        pm.save_pretrained(str(path), safe_serialization=True)
        del pm, m
    return base, pt, sft


PEFT_SCRIPT = r'''
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, pt, sft, out = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
pm = PeftModel.from_pretrained(model, pt, adapter_name="pt")
pm.load_adapter(sft, adapter_name="sft")
pm.add_weighted_adapter(["pt", "sft"], [0.3, 0.7], "mix", combination_type="cat")
pm.set_adapter("mix")
merged = pm.merge_and_unload()
merged.save_pretrained(out, safe_serialization=True)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=WORK / "results.json")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup_only:
        setup()
        return
    # Set up in a child: on Linux a child inherits its parent's peak RSS across fork and exec, so this
    # process must stay small for the children's ru_maxrss to be their own.
    import subprocess

    subprocess.run([PY, __file__, "--setup-only"], check=True)
    base, pt, sft = WORK / "base", WORK / "pt", WORK / "sft"
    env = _common.child_env(args.threads)
    script = WORK / "peft_route.py"
    script.write_text(PEFT_SCRIPT)
    cmds = {
        "medmerge": [PY, "-m", "medmerge.cli", "adapters", "merge", "--base", str(base), "--adapter", f"{pt}:0.3",
                     "--adapter", f"{sft}:0.7", "--out", str(WORK / "out_medmerge"), "--force", "-q"],
        "medmerge --no-verify": [PY, "-m", "medmerge.cli", "adapters", "merge", "--base", str(base), "--adapter",
                                 f"{pt}:0.3", "--adapter", f"{sft}:0.7", "--out", str(WORK / "out_medmerge_nv"),
                                 "--force", "-q", "--no-verify"],
        "medmerge --verify-all": [PY, "-m", "medmerge.cli", "adapters", "merge", "--base", str(base), "--adapter",
                                  f"{pt}:0.3", "--adapter", f"{sft}:0.7", "--out", str(WORK / "out_medmerge_va"),
                                  "--force", "-q", "--verify-all"],
        "peft": [PY, str(script), str(base), str(pt), str(sft), str(WORK / "out_peft"), str(args.threads)],
    }
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for rep in range(args.repeats):
        order = list(cmds) if rep % 2 == 0 else list(reversed(cmds))
        for name in order:
            if name == "peft":
                import shutil

                shutil.rmtree(WORK / "out_peft", ignore_errors=True)
            r = _common.run_timed(cmds[name], env, WORK / "logs" / f"{name.replace(' ', '_')}_{rep}.log", 1800)
            if r["rc"] != 0:
                sys.exit(f"{name} failed (rc {r['rc']}); see {r['log']}")
            runs[name].append(r)
            print(f"  {name:22s} run {rep}: {r['wall_s']:7.1f} s wall, {r['peak_rss_mb']:8.0f} MB peak RSS", flush=True)
    checks = {}
    for name, out in (("medmerge", WORK / "out_medmerge"), ("peft", WORK / "out_peft")):
        vcmd = [PY, "-m", "medmerge.cli", "verify", str(out), "--base", str(base), "--adapter", f"{pt}:0.3",
                "--adapter", f"{sft}:0.7", "--json", str(WORK / f"verify_{name}.json"), "-q"]
        r = _common.run_timed(vcmd, env, WORK / "logs" / f"verify_{name}.log", 1800)
        rep = json.loads((WORK / f"verify_{name}.json").read_text())
        worst = max((c["max_abs"] for c in rep["checked"]), default=0.0)
        checks[name] = {"ok": rep["ok"], "max_abs_error": worst, "rc": r["rc"]}
    med = {k: {"wall_s": statistics.median(x["wall_s"] for x in v),
               "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in v)} for k, v in runs.items()}
    print()
    print("| run | wall s (median) | peak RSS MB (median) | PEFT / this: wall | PEFT / this: RSS |")
    print("|---|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v['wall_s']:.1f} | {v['peak_rss_mb']:.0f} | {med['peft']['wall_s'] / v['wall_s']:.2f} | "
              f"{med['peft']['peak_rss_mb'] / v['peak_rss_mb']:.2f} |")
    print()
    for k, c in checks.items():
        print(f"verify {k} output against W0 + 0.3 dW_PT + 0.7 dW_SFT: ok={c['ok']}, largest abs error "
              f"{c['max_abs_error']:.3g}")
    result = {"machine": _common.machine_info(("torch", "transformers", "peft", "safetensors")),
              "threads": args.threads, "repeats": args.repeats, "runs": runs, "median": med, "verify": checks,
              "commands": {k: _common.shell(v) for k, v in cmds.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
