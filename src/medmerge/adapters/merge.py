"""`medmerge adapters merge`: W = W0 + sum_i w_i dW_i, exported as full weights or as an adapter.

The inputs are opened and checked first (`inputs.open_inputs`). `as_="full"` then streams
the base tensor by tensor through `io.stream.write_transformed` (one tensor in memory at a
time), adds the combined delta to each target, and verifies the written folder against a
fresh recomputation before moving it into place. `as_="adapter"` writes a PEFT adapter:
`cat` (rank sum r_i, exact), or a rank-R SVD with the discarded energy reported per module
and overall.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from safetensors.torch import save_file

from ..errors import InputError, MedmergeError
from ..io.fingerprint import sha256_file
from ..io.folders import copy_support_files, dtype_name
from ..io.stream import readback_problems, write_transformed
from ..io.writer import atomic_output_dir, check_output, output_path
from ..io.writer import shard_size as shard_bytes
from ..merging.provenance import RECORDED_LIBRARIES
from ..runtime import library_versions, progress as progress_bar
from .combine import DENSITY_METHODS, METHODS, combine, svd_factors
from .inputs import RECORD_KEY, AdapterInputs, module_name, open_inputs
from .lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, peft_lora_config
from .verify import verify_adapter_merge

SAMPLE_MODULES = 8  # modules recomputed from the inputs by the merge's own verification (all with verify="full")
OUT_DTYPES = ("float32", "bfloat16", "float16")  # what --dtype may be


def check_method(method: str, density: Optional[float], rank: Optional[int], as_: str) -> None:
    if method not in METHODS:
        raise InputError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if as_ not in ("full", "adapter"):
        raise InputError(f"--as {as_!r}: use full or adapter")
    if method in DENSITY_METHODS:
        if density is None:
            raise InputError(f"--method {method} needs --density (the fraction of each dW_i kept, in (0, 1])")
        if not 0 < density <= 1:
            raise InputError(f"--density {density}: use a fraction in (0, 1]")
    elif density is not None:
        raise InputError(f"--density applies to {', '.join(DENSITY_METHODS)}, not to {method}")
    if rank is not None and rank < 1:
        raise InputError(f"--rank {rank}: use a positive integer")
    if method == "svd" and as_ == "full":
        raise InputError("--method svd --as full would write the rank-R approximation into full weights; use "
                         "--method exact --as full for the exact merge, or --as adapter for the SVD")
    if method == "cat" and as_ == "full":
        raise InputError("--method cat is an adapter export (rank sum r_i); --as full with --method exact writes "
                         "the same weights")


@dataclass
class ModuleResult:
    target: str
    residual: Optional[float] = None  # Frobenius norm of (combined dW - exported dW), SVD exports
    norm: Optional[float] = None  # Frobenius norm of the combined dW


def merge_adapters(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out: str | Path,
    *,
    method: str = "exact",
    as_: str = "full",
    density: Optional[float] = None,
    rank: Optional[int] = None,
    seed: int = 0,
    dtype: Optional[str] = None,
    shard_size: str = "5GB",
    allow_missing: bool = False,
    allow_pickle: bool = False,
    check_base: bool = True,
    verify: bool | str = True,  # True: read back every tensor + recompute a sample; "full": recompute all; False
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Merge LoRA adapters into OUT; return the record written to OUT/medmerge.yml."""
    check_method(method, density, rank, as_)
    out = output_path(out).absolute()
    size = shard_bytes(shard_size)
    sources = [base, *(path for path, _ in adapters)]
    check_output(out, force, sources)  # never is, holds or lies inside the base or an adapter
    out_dtype = None
    if dtype is not None:
        if dtype not in OUT_DTYPES:  # not float8 (a quantised format, not a dtype to export weights in), not float64
            raise InputError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
        out_dtype = getattr(torch, dtype)
    inputs = open_inputs(base, adapters, allow_missing=allow_missing, allow_pickle=allow_pickle,
                         check_base=check_base)
    if method == "exact" and as_ == "adapter":
        method_used = "cat"
        inputs.notes.append("--method exact --as adapter writes the exact concatenated adapter (cat)")
    else:
        method_used = method
    try:
        if as_ == "adapter" and method_used != "cat" and rank is not None:
            check_svd_rank(inputs, rank)  # every adapter export but cat is a rank-R SVD of the combined delta
        with atomic_output_dir(out, force=force, inputs=sources) as tmp:
            record = _record(inputs, method_used, as_, density, rank, seed, out_dtype)
            record[RECORD_KEY]["allow_missing"] = allow_missing
            checksums = None
            if as_ == "full":
                results, checksums = _write_full(inputs, tmp, method_used, density, seed, out_dtype,
                                                 size, progress)
            else:
                results, record["rank"] = _write_adapter(inputs, tmp, method_used, density, rank, seed, progress)
            record["stats"] = _stats(results)
            record["notes"] = inputs.notes
            _write_record(tmp, record)
            if verify:
                # full exports: every tensor is read back byte for byte (CRC-32) and a sample of modules is
                # recomputed from the inputs; verify="full" (and `medmerge verify OUT`) recomputes every module
                only = None
                if checksums is not None and verify != "full":
                    only = sample_targets(inputs, SAMPLE_MODULES, seed)
                report = verify_adapter_merge(tmp, inputs=inputs, only=only, progress=progress)
                if checksums is not None:
                    report.problems += readback_problems(tmp, checksums)
                record["verified"] = {**report.summary(), "mode": "full" if only is None else
                                      f"every tensor read back (CRC-32); {len(only)} of {len(inputs.modules)} "
                                      "modules recomputed"}
                if not report.ok:
                    raise MedmergeError("the written merge does not match the intended combination: "
                                        + "; ".join(report.problems[:5] + [c.name for c in report.checked if not c.ok][:5])
                                        + f"; nothing was written to {out}")
                _write_record(tmp, record)
    finally:
        inputs.close()
    return record


def summary(record: dict, out: str | Path) -> str:
    """What an adapter merge did, in a few lines (what `medmerge adapters merge` prints)."""
    info = record[RECORD_KEY]
    stats = record.get("stats", {})
    parts = ", ".join(f"{a['weight']:g} x {a['path']}" for a in info["adapters"])
    lines = [f"merged {stats.get('modules', 0)} modules ({info['method']}, as {info['as']}) of {parts} into {out}"]
    if "svd_relative_residual" in stats:
        lines.append(f"SVD rank {info['rank']}: relative residual {stats['svd_relative_residual']:.3g} "
                     "(per module in medmerge.yml)")
    if "verified" in record:
        v = record["verified"]
        lines.append(f"verified ({v['mode']}): largest abs error {v['max_abs_error']:.3g}")
    lines += [f"note: {note}" for note in record.get("notes", [])]
    return "\n".join(lines)


def _record(inputs: AdapterInputs, method: str, as_: str, density, rank, seed, out_dtype) -> dict:
    adapters = []
    for a, w in zip(inputs.adapters, inputs.weights):
        ranks = sorted({m.r for m in a.modules.values()})
        adapters.append({
            "path": str(a.path), "weight": w, "sha256": sha256_file(a.records[next(iter(a.records))].file),
            "r": ranks if len(ranks) > 1 else ranks[0], "lora_alpha": a.config.get("lora_alpha"),
            "use_rslora": bool(a.config.get("use_rslora")), "modules": len(a.modules),
            "base_fingerprint": a.recorded_base_fingerprint,
        })
    return {
        RECORD_KEY: {
            "base": str(inputs.base.path), "adapters": adapters, "method": method, "as": as_,
            "density": density, "rank": rank, "seed": seed,
            "dtype": dtype_name(out_dtype) if out_dtype else None,
            "formula": "W = W0 + sum_i w_i dW_i, dW_i = s_i B_i A_i (s_i = lora_alpha/r, or /sqrt(r) with rslora)",
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(*RECORDED_LIBRARIES),
    }


def _write_record(folder: Path, record: dict) -> None:
    (folder / "medmerge.yml").write_text(
        "# Written by `medmerge adapters merge`; check with `medmerge verify <this folder>`.\n"
        + yaml.safe_dump(record, sort_keys=False))
    (folder / "README.md").write_text(model_card(record))


def model_card(record: dict) -> str:
    """The provenance card: what was merged, how, from which files, and whether it verified."""
    info = record[RECORD_KEY]
    kind = "merged model" if info["as"] == "full" else "merged LoRA adapter"
    lines = [
        "---", "library_name: " + ("transformers" if info["as"] == "full" else "peft"),
        "tags: [medmerge, lora, adapter-merge]", "---",
        f"# {kind.capitalize()} ({info['method']})", "",
        f"Made with medmerge {record['versions']['medmerge']} on {record['date']} by `medmerge adapters merge`.", "",
        "## Formula", "", f"    {info['formula']}", "",
        f"Method `{info['method']}`" + (f", density {info['density']}" if info.get("density") is not None else "")
        + (f", rank {info['rank']}" if info.get("rank") else "") + f", seed {info['seed']}.", "",
        "## Inputs", "", f"Base: `{info['base']}`", "",
        "| adapter | weight | r | lora_alpha | rsLoRA | sha256 |", "|---|---|---|---|---|---|",
    ]
    for a in info["adapters"]:
        lines.append(f"| `{a['path']}` | {a['weight']:g} | {a['r']} | {a['lora_alpha']} | {a['use_rslora']} | "
                     f"`{a['sha256']}` |")
    stats = record.get("stats") or {}
    if "svd_relative_residual" in stats:
        lines += ["", f"SVD export: relative Frobenius residual {stats['svd_relative_residual']:.4g} overall "
                      "(per module in medmerge.yml)."]
    v = record.get("verified")
    if v:
        lines += ["", "## Verification", "",
                  f"{'Passed' if v['ok'] else 'FAILED'}: {v['modules_checked']} modules recomputed, largest absolute "
                  f"error {v['max_abs_error']:.3g}."]
    for n in record.get("notes") or []:
        lines.append(f"- note: {n}")
    lines += ["", "## Library versions", *[f"- {k} {v}" for k, v in record["versions"].items()], ""]
    return "\n".join(lines)


def _stats(results: list[ModuleResult]) -> dict:
    stats: dict = {"modules": len(results)}
    with_res = [r for r in results if r.residual is not None]
    if with_res:
        total = math.sqrt(sum(r.norm ** 2 for r in with_res))
        resid = math.sqrt(sum(r.residual ** 2 for r in with_res))
        stats["svd_relative_residual"] = resid / total if total else 0.0
        stats["svd_relative_residual_per_module"] = {
            r.target.removesuffix(".weight"): (r.residual / r.norm if r.norm else 0.0) for r in with_res}
    return stats


def _write_full(inputs: AdapterInputs, folder: Path, method: str, density, seed: int, out_dtype, shard_size: int,
                progress: bool) -> tuple[list[ModuleResult], dict[str, int]]:
    results = []

    def merged(name: str, w0: torch.Tensor) -> torch.Tensor:
        if name not in inputs.modules:
            return w0
        results.append(ModuleResult(name))
        return inputs.merged_weight(name, w0, method, density, seed)

    checksums = write_transformed(inputs.base, folder, merged, out_dtype=out_dtype, shard_size=shard_size,
                                  description="merging adapters", metadata={"medmerge": "adapters merge"},
                                  progress=progress)
    return results, checksums


def sample_targets(inputs: AdapterInputs, k: int, seed: int) -> set[str]:
    """`k` targeted tensors for the in-merge recomputation: one per module kind first, then random."""
    targets = sorted(inputs.modules)
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {}
    for t in targets:
        by_kind.setdefault(t.rsplit(".", 2)[-2], []).append(t)
    chosen = {rng.choice(v) for v in by_kind.values()}
    rest = [t for t in targets if t not in chosen]
    chosen |= set(rng.sample(rest, max(0, min(k - len(chosen), len(rest)))))
    return chosen


def adapter_factors(inputs: AdapterInputs, target: str, method: str, density, rank: Optional[int],
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, ModuleResult]:
    """(A, B) of the exported adapter for one module, in PEFT's orientation (scaling 1)."""
    result = ModuleResult(target)
    if method == "cat":
        fa, fb, _ = inputs.stacked_factors(target)
        return fa, fb, result
    # factor orientation: B @ A, i.e. the transpose of the weight delta for embedding / fan_in_fan_out
    combined = combine(inputs.deltas(target), inputs.weights, method, density, seed, module_name(target))
    if inputs.first_module(target).transpose:
        combined = combined.T.contiguous()
    fa, fb, _, norm = svd_factors(combined, rank)
    result.residual = float(torch.linalg.matrix_norm((combined - fb @ fa).to(torch.float64)))
    result.norm = norm
    return fa, fb, result


def check_svd_rank(inputs: AdapterInputs, rank: int) -> None:
    """Refuse an SVD rank above every module's full rank min(out, in): the extra rank would be zero padding.

    A rank above some modules' full rank (but not all) is kept: those modules are padded with zeros
    to the one rank the adapter declares, as before.
    """
    full = {t: min(inputs.base.records[t].shape[:2]) for t in inputs.modules}
    largest = max(full.values())
    if rank > largest:
        widest = max(full, key=full.get)
        raise InputError(
            f"--rank {rank} is above the full rank of every module (at most {largest}, for "
            f"{module_name(widest)} of shape {list(inputs.base.records[widest].shape)}): an SVD of rank {rank} would "
            f"add only zeros; use --rank {largest} or less (the exact combination has rank {default_rank(inputs)}: "
            "--method cat writes it exactly)")


def default_rank(inputs: AdapterInputs) -> int:
    """sum of the adapters' ranks (the largest over modules): the rank of the exact combination."""
    return max(sum(a.modules[m].r for a, m in zip(inputs.adapters, names) if m is not None)
               for names in inputs.modules.values())


def _write_adapter(inputs: AdapterInputs, folder: Path, method: str, density, rank: Optional[int], seed: int,
                   progress: bool) -> tuple[list[ModuleResult], int]:
    if method != "cat" and rank is None:
        rank = default_rank(inputs)
    state, ranks, results = {}, {}, []
    first_cfg = inputs.adapters[0].config
    with progress_bar(progress) as bar:
        task = bar.add_task("merging adapters", total=len(inputs.modules))
        for target in inputs.modules:
            fa, fb, res = adapter_factors(inputs, target, method, density, rank, seed)
            results.append(res)
            module = module_name(target)
            emb = inputs.first_module(target).a.name.endswith("lora_embedding_A")
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            state[f"{PREFIX}{module}.{a_key}"] = fa.contiguous()
            state[f"{PREFIX}{module}.{b_key}"] = fb.contiguous()
            ranks[module] = fa.shape[0]
            bar.advance(task)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = peft_lora_config(inputs.base.path, ranks, task_type=first_cfg.get("task_type", "CAUSAL_LM"),
                              fan_in_fan_out=first_cfg.get("fan_in_fan_out", False))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    copy_support_files(inputs.adapters[0].path, folder, generation=False)
    return results, (rank if rank is not None else config["r"])
