"""`medmerge medcare export RUN --out OUT`: fold a MedCare run into a plain transformers checkpoint.

The folded weights are computed tensor by tensor from the base checkpoint and the
run's saved factors (the formula, not the module code):

    attention:  W = W0 + (alpha / r) B A                    (stage 1's LoRA)
    FFN:        W = W0 + s (B_KA A_KA + B_AM A_AM)          (AM only after stage 2)

and streamed through the merge engine's sharded writer into a temporary folder
that is moved into place at the end, with `medmerge.yml` (provenance) and a model
card. Verification: every tensor is read back (CRC-32), and the exported model's
logits on a seeded batch of token ids are compared with the MedCare module model's
(the base with MedCare layers, computing the low-rank paths at run time).
Routed noise experts depend on the input and cannot be folded: a stage-1 run is
exported only with `drop_noise=True` (its knowledge path), a stage-2 run that kept
its noise experts (the ablation) not at all.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..errors import InputError, MedmergeError
from ..io.checkpoint import Checkpoint
from ..io.fingerprint import check_recorded_base, files_sha256
from ..io.folders import check_model, dtype_name
from ..io.stream import readback_problems, write_transformed
from ..io.writer import atomic_output_dir, check_output
from ..io.writer import shard_size as shard_bytes
from ..merging.provenance import RECORDED_LIBRARIES
from ..runtime import library_versions, resolve_device
from .model import CONFIG_FILE, WEIGHTS_FILE, read_run
from .train import load_run

# largest |exported - module| logit difference allowed, relative to max(1, largest |logit|); float32 folds
# differ from the unfolded model only by summation order, 16-bit folds also by rounding W0 + delta once
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
FORMULA = ("attention: W = W0 + (alpha/r) B A; FFN: W = W0 + s (B_KA A_KA + B_AM A_AM); router and noise "
           "experts dropped")


def folded_deltas(info: dict, tensors: dict[str, torch.Tensor], drop_noise: bool) -> dict[str, tuple]:
    """{W0 tensor name: [(scale, B, A), ...]} for every adapted projection of a saved run."""
    noise = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".noise_A", ".router.weight"))})
    if noise and not drop_noise:
        what = ("a stage-1 run" if info["stage"] == 1 else "a stage-2 run that kept its noise experts "
                "(alignment.keep_noise)")
        raise InputError(f"{what} has routed noise experts (e.g. {noise[0]}), whose output depends on the input "
                         "and cannot be folded into weights; export the stage-2 run, or pass --drop-noise to "
                         "export the knowledge path alone")
    att = info["modules"]["attention"]
    s_att, s_ffn = att["alpha"] / att["r"], info["modules"]["ffn"]["scaling"]
    out: dict[str, list] = {}
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part in ("lora_A", "ka_A", "am_A"):
            prefix = part[:-2]
            scale = s_att if prefix == "lora" else s_ffn
            out.setdefault(f"{module}.weight", []).append((scale, tensors[f"{module}.{prefix}_B"], tensors[key]))
    return out


def export(run: str | Path, out: str | Path, *, base: Optional[str | Path] = None, drop_noise: bool = False,
           dtype: Optional[str] = None, shard_size: str = "5GB", verify: bool = True, verify_tokens: int = 64,
           verify_batch: int = 4, device: str = "cpu", force: bool = False, progress: bool = True) -> dict:
    """Write the folded model to OUT; return the record also written to OUT/medmerge.yml."""
    run, out = Path(run).absolute(), Path(out).absolute()
    check_output(out, force, [run, base])  # never is, holds or lies inside the run or the base
    max_shard = shard_bytes(shard_size)  # checked before any reading
    device = resolve_device(device)
    info, tensors = read_run(run)
    base_path = check_model(base or info["base"]["path"])
    check_recorded_base(base_path, info["base"]["fingerprint"], trained=str(run), fix="pass --base with that model")
    check_output(out, force, [run, base_path])
    out_dtype = None
    if dtype is not None:
        out_dtype = getattr(torch, dtype, None)
        if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
            raise InputError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    deltas = folded_deltas(info, tensors, drop_noise)
    ckpt = Checkpoint(base_path)
    unknown = sorted(set(deltas) - set(ckpt.records))
    if unknown:
        raise InputError(f"{run}: adapted tensors {unknown[:3]} are not in base {base_path}")
    record = {
        "medmerge": {
            "kind": "medcare-export", "run": str(run), "stage": info["stage"],
            "run_sha256": files_sha256([run / WEIGHTS_FILE, run / CONFIG_FILE]),
            "base": str(base_path), "base_fingerprint": info["base"]["fingerprint"],
            "formula": FORMULA, "drop_noise": drop_noise, "modules_folded": len(deltas),
            "dtype": dtype, "modules": info["modules"], "alignment": info.get("alignment"),
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(*RECORDED_LIBRARIES),
    }
    try:
        with atomic_output_dir(out, force=force, inputs=[run, base_path]) as tmp:
            def fold(name: str, w0: torch.Tensor) -> torch.Tensor:
                if name not in deltas:
                    return w0
                w = w0.float()
                for scale, b, a in deltas[name]:
                    w = w + scale * (b.float() @ a.float())
                return w

            checksums = write_transformed(ckpt, tmp, fold, out_dtype=out_dtype, shard_size=max_shard,
                                          description="folding MedCare", metadata={"medmerge": "medcare export"},
                                          progress=progress)
            problems = readback_problems(tmp, checksums)
            if verify:
                record["verified"] = verify_logits(tmp, run, base_path, drop_noise, tokens=verify_tokens,
                                                   batch=verify_batch, seed=info["seed"], device=device)
                if not record["verified"]["ok"]:
                    problems.append(f"logits differ by {record['verified']['max_abs_diff']:.3g}, more than the "
                                    f"tolerance {record['verified']['tolerance']:.3g}")
            record["readback"] = {"tensors": len(checksums), "ok": not problems}
            if problems:
                raise MedmergeError("the exported model does not reproduce the MedCare model: "
                                    + "; ".join(problems[:5]) + f"; nothing was written to {out}")
            _write_record(tmp, record)
    finally:
        ckpt.close()
    return record


def _logits(model, ids: torch.Tensor, device: str) -> torch.Tensor:
    model.to(device).eval()
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def verify_logits(folder: Path, run: Path, base: Path, drop_noise: bool, *, tokens: int = 64, batch: int = 4,
                  seed: int = 0, device: str = "cpu") -> dict:
    """Exported logits vs the MedCare module model's on a seeded batch of random token ids (float32 compute).

    Reports the largest absolute difference, the tolerance (TOLERANCE[dtype] * max(1, largest |logit|)),
    the share of positions whose argmax agrees, and the adapters' own effect (largest |module - base|),
    so that a fold which dropped a term shows as a difference of the effect's size.
    """
    from transformers import AutoModelForCausalLM  # deferred: transformers takes seconds to import

    config = json.loads((folder / "config.json").read_text())
    vocab = int(config["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    base_logits = _logits(plain, ids, device)
    del plain
    module = load_run(run, base=base, drop_noise=drop_noise).model
    module_logits = _logits(module, ids, device)
    del module
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    export_logits = _logits(exported, ids, device)
    del exported
    written = Checkpoint(folder)
    dtypes = {r.torch_dtype for r in written.records.values() if r.torch_dtype.is_floating_point}
    written.close()
    worst = max(dtypes, key=lambda d: torch.finfo(d).eps)  # the least precise stored dtype sets the tolerance
    scale = max(1.0, float(module_logits.abs().max()))
    diff = float((export_logits - module_logits).abs().max())
    tolerance = TOLERANCE.get(worst, 3e-2) * scale
    return {
        "ok": diff <= tolerance, "max_abs_diff": diff, "tolerance": tolerance,
        "tolerance_rule": f"{TOLERANCE.get(worst, 3e-2):g} x max(1, max |logit|) for {dtype_name(worst)}",
        "argmax_agreement": float((export_logits.argmax(-1) == module_logits.argmax(-1)).float().mean()),
        "adapter_effect": float((module_logits - base_logits).abs().max()),
        "inputs": {"batch": batch, "tokens": tokens, "seed": seed, "kind": "random token ids"},
        "device": device,
    }


def _write_record(folder: Path, record: dict) -> None:
    (folder / "medmerge.yml").write_text("# Written by `medmerge medcare export`.\n"
                                         + yaml.safe_dump(record, sort_keys=False))
    info, v = record["medmerge"], record.get("verified")
    lines = ["---", "library_name: transformers", "tags: [medmerge, medcare]", "---",
             f"# MedCare model (stage {info['stage']}, folded)", "",
             f"Folded from `{info['run']}` on base `{info['base']}` by `medmerge medcare export` "
             f"(medmerge {record['versions'].get('medmerge')}, {record['date']}).", "",
             "## Formula", "", f"    {info['formula']}", ""]
    if info.get("alignment"):
        lines += [f"Stage 2 alignment module rank {info['alignment']['rank']}, lambda {info['alignment']['lambda']}.",
                  ""]
    if v:
        lines += ["## Verification", "",
                  f"{'Passed' if v['ok'] else 'FAILED'}: exported vs MedCare module logits on {v['inputs']['batch']} x "
                  f"{v['inputs']['tokens']} random tokens: max abs diff {v['max_abs_diff']:.3g} (tolerance "
                  f"{v['tolerance']:.3g}, {v['tolerance_rule']}); argmax agreement {v['argmax_agreement']:.4f}; "
                  f"the adapters' own effect on the logits {v['adapter_effect']:.3g}.", ""]
    lines += ["## Library versions", *[f"- {k} {val}" for k, val in record["versions"].items()], ""]
    (folder / "README.md").write_text("\n".join(lines))
