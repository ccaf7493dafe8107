"""Why does the clinical model trained with `freeze_unseen_tokens` score lower on the MCQ? (issue 16 diagnostics)

Usage: THREADS=2 .venv/bin/python bench/experiments/miniclinic_frozen_rows.py WORLD OUT
WORLD is a built full world (`medmerge miniclinic build` or a demo's `OUT/world`). Trains the clinical stage again
without freezing (the same config otherwise), then evaluates MCQ (and ROUGE-L) for models whose embedding rows are
swapped between the two: which of the frozen rows (chat tokens, words only the instruction data has, the rest) cost
the frozen model its points. Results: docs/miniclinic.md, "Why the clinical model's MCQ is 0.63".
"""
import json, os, shutil, subprocess, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from medmerge.miniclinic.build import _mixed_text
from medmerge.miniclinic.world import TASKS_DIR
from medmerge.training.config import load_config
from medmerge.training.trainer import train

W, D = Path(sys.argv[1]), Path(sys.argv[2])
D.mkdir(parents=True, exist_ok=True)
K = "model.embed_tokens.weight"
base_dir, clin_dir, nf_dir = W / "models/base", W / "models/clinical", D / "clinical_unfrozen"
rec = json.load(open(clin_dir / "medmerge_train.json"))
if not (nf_dir / "config.json").is_file():
    corpora = W / "data/corpora"  # the build's clinical-stage text: half clinical, half general replay, seed + 1
    text = _mixed_text([(corpora / "clinical.txt", 0.5), (corpora / "general.txt", 0.5)], D / "clinical_text.txt",
                       rec["seed"] + 1)
    t = rec["config"]["training"]
    raw = {"stage": "pt", "model": str(base_dir), "data": {"path": str(text)}, "seed": rec["seed"],
           "max_seq_length": rec["config"]["max_seq_length"], "freeze_unseen_tokens": False,
           "training": {k: t[k] for k in ("max_steps", "batch_size", "lr", "scheduler", "warmup_ratio",
                                          "logging_steps", "save_steps", "threads", "device")}}
    train(load_config(None, raw=raw), nf_dir, force=True, progress=False)

base, clin, nf = (load_file(str(p / "model.safetensors")) for p in (base_dir, clin_dir, nf_dir))
frozen = [i for i in range(base[K].shape[0]) if torch.equal(base[K][i], clin[K][i])]
tok = AutoTokenizer.from_pretrained(str(base_dir))
chat = [tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")]
in_mcq = set()
for line in open(W / "data/eval/mcq.jsonl"):
    q = json.loads(line)
    for s in (q["context"], q["question"], *q["choices"]):
        in_mcq.update(tok(" " + s, add_special_tokens=False)["input_ids"])
frozen_mcq = sorted(set(frozen) & in_mcq)
print(f"{len(frozen)} rows frozen in clinical; {len(frozen_mcq)} of them occur in MCQ items: "
      f"{tok.convert_ids_to_tokens(frozen_mcq)}; e.g. {tok.convert_ids_to_tokens(frozen[:20])}")


def swapped(name: str, body: dict, rows_from: dict, ids: list[int]) -> Path:
    out = D / name
    shutil.copytree(nf_dir if body is nf else clin_dir, out, dirs_exist_ok=True)
    sd = dict(body)
    sd[K] = body[K].clone()
    sd[K][ids] = rows_from[K][ids]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


models = {
    "clinical (frozen)": clin_dir, "clinical unfrozen": nf_dir,
    "frozen + unfrozen's chat rows": swapped("frozen_unfrozen_chat", clin, nf, chat),
    "unfrozen + base's chat rows": swapped("unfrozen_base_chat", nf, base, chat),
    "unfrozen + base's rows for every frozen token": swapped("unfrozen_base_frozen", nf, base, frozen),
    "unfrozen + base's rows for frozen tokens but chat": swapped(
        "unfrozen_base_frozen_not_chat", nf, base, [i for i in frozen if i not in chat]),
    "unfrozen + base's rows for frozen tokens in MCQ items": swapped("unfrozen_base_frozen_mcq", nf, base, frozen_mcq),
    "unfrozen + base's rows for frozen tokens not in MCQ, not chat": swapped(
        "unfrozen_base_frozen_rest", nf, base, [i for i in frozen if i not in frozen_mcq and i not in chat]),
}
for i, (name, folder) in enumerate(models.items()):
    out = D / "eval" / str(i)
    subprocess.run([sys.executable, "-m", "medmerge.cli", "eval", str(folder), "--tasks",
                    "mm_miniclinic_mcq,mm_miniclinic_gen", "--include-path", str(TASKS_DIR), "--data-dir",
                    str(W / "data"), "--out", str(out), "--batch-size", "32", "--device", "cpu", "--force"],
                   check=True, capture_output=True)
    r = json.load(open(out / "results.json"))["tasks"]
    print(f"{name:<62} MCQ acc {r['mm_miniclinic_mcq']['acc']:.3f}  ROUGE-L {r['mm_miniclinic_gen']['rougeL']:.1f}",
          flush=True)
