"""`medmerge adapters extract`: a PEFT LoRA adapter from a fine-tune, by truncated SVD of W_tuned - W_base.

For each linear weight of the model (every 2-D `.weight` that is not vocabulary-indexed;
embeddings and the output head too with `embed_lora`) the delta D = W_tuned - W_base is
formed in float64 and factored, D = U S V^T, and kept at rank k:

    B = U_k sqrt(S_k)   (out x k),   A = sqrt(S_k) V_k^T   (k x in),   lora_alpha = k,

so PEFT's scaling lora_alpha / r is 1 and B @ A = U_k S_k V_k^T, the best rank-k
approximation (Eckart-Young). The square root of S goes to both factors as in mergekit's
`mergekit-extract-lora` (its default `--distribute-scale`): neither factor carries the
whole scale, which keeps float16/bfloat16 factors in range. The energy kept by a module is
sum_{i<k} s_i^2 / sum_i s_i^2 = 1 - ||D - B A||_F^2 / ||D||_F^2.

Ranks: `rank=R` keeps min(R, min(out, in)) per module; `rank="auto"` keeps, per module, the
smallest k whose energy is at least `energy` (at most `max_rank`). Modules whose rank differs
from the adapter's `r` go to `rank_pattern` and `alpha_pattern`.

What a LoRA cannot carry follows mergekit: a changed tensor that is not a LoRA target (norms,
embeddings and the output head unless `embed_lora`, tensors of more than two axes) has its whole
module saved from TUNED in `modules_to_save` (PEFT then swaps the module in); `save_modules`
asks for that explicitly (mergekit's `--save-module`). `skip_undecomposable` leaves such
changes out instead, and reports them. Unlike mergekit, modules that did not change are not
written (neither LoRA factors of zeros nor copies of unchanged norms). A changed bias of a LoRA
target is refused: PEFT's `lora_bias` is one switch for every target and cannot be merged into
a layer without a bias, and mergekit's `lora_B.bias` without it is dropped silently by PEFT.

Both models are read tensor by tensor (at most a few tensors in memory besides the adapter being
built). The record goes to `medmerge_extract.json`, whose base fingerprint the same-base
checks of `medmerge adapters merge` and `medmerge eval --peft` read
(`io.fingerprint.check_adapter_base`), so the adapter is accepted against BASE and refused
against any other base.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.fingerprint import EXTRACT_RECORD, fingerprint
from ..io.folders import check_model, copy_support_files
from ..io.stream import prefetch
from ..io.writer import atomic_output_dir, check_output, output_path
from ..merging.architecture import OUTPUT_HEADS, vocab_axis
from ..merging.plan import check_architectures
from ..merging.provenance import RECORDED_LIBRARIES
from ..runtime import library_versions, resolve_device
from ..runtime import progress as progress_bar
from .lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, peft_lora_config

FACTOR_DTYPES = ("float32", "bfloat16", "float16")
SVD_DTYPES = ("float64", "float32")
CONV1D_MODEL_TYPES = ("gpt2",)  # weights stored (in, out) in transformers' Conv1D, not nn.Linear
ENERGY_SLACK = 1e-12  # an energy within this of the asked fraction reaches it (float64 rounding of cumsum)
COMMAND = "medmerge adapters extract"


@dataclass
class ExtractPlan:
    """What is read and what becomes what: decided, and checked, before any SVD."""

    base: Checkpoint
    tuned: Checkpoint
    targets: list[str]  # LoRA target weights, in TUNED's file order
    embedding: set[str]  # targets that take embedding LoRA (lora_embedding_A/B, dW = (B A)^T)
    others: list[str]  # every other tensor
    saved: dict[str, list[str]] = field(default_factory=dict)  # module -> its tensors, saved whole from TUNED
    skipped: dict[str, float] = field(default_factory=dict)  # changed tensor left out -> max abs change
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.base.close()
        self.tuned.close()


def parse_rank(rank) -> int | str:
    """--rank: a positive whole number, or "auto" (with --energy)."""
    if isinstance(rank, str):
        text = rank.strip().lower()
        if text == "auto":
            return "auto"
        if not re.fullmatch(r"[+-]?\d+", text):
            raise InputError(f"--rank {rank!r}: give a positive whole number (e.g. 16), or auto with --energy")
        rank = int(text)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InputError(f"--rank {rank!r}: give a positive whole number (e.g. 16), or auto with --energy")
    if rank < 1:
        raise InputError(f"--rank {rank}: a LoRA rank is a positive whole number (PEFT divides by it)")
    return rank


def check_options(rank, energy: Optional[float], max_rank: Optional[int], dtype: str, svd_dtype: str) -> int | str:
    """The rank settings and dtypes, checked before anything is read; returns the parsed rank."""
    rank = parse_rank(rank)
    if rank == "auto":
        if energy is None:
            raise InputError("--rank auto needs --energy E, the fraction of each module's squared Frobenius norm "
                             "to keep (0 < E <= 1), e.g. --energy 0.9")
        if not (isinstance(energy, (int, float)) and math.isfinite(energy) and 0 < energy <= 1):
            raise InputError(f"--energy {energy}: give a fraction in (0, 1] of each module's squared Frobenius norm "
                             "to keep (1 keeps every nonzero singular value)")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise InputError(f"--max-rank {max_rank}: give a positive whole number")
    else:
        if energy is not None:
            raise InputError(f"--energy applies to --rank auto; with --rank {rank} every module keeps rank {rank}")
        if max_rank is not None:
            raise InputError(f"--max-rank applies to --rank auto; --rank {rank} already fixes the rank")
    if dtype not in FACTOR_DTYPES:
        raise InputError(f"--dtype {dtype!r}: the LoRA factors are saved as float32, bfloat16 or float16")
    if svd_dtype not in SVD_DTYPES:
        raise InputError(f"--svd-dtype {svd_dtype!r}: use float64 (exact to float32's precision) or float32 "
                         "(faster, as mergekit)")
    return rank


def module_of(tensor: str) -> str:
    """model.layers.0.mlp.down_proj.weight -> model.layers.0.mlp.down_proj"""
    return tensor.rsplit(".", 1)[0]


def _save_listed(module: str, save_modules: Sequence[str]) -> bool:
    """mergekit's rule for --save-module: the module's full name or its last part (e.g. lm_head, norm)."""
    return module in save_modules or module.rsplit(".", 1)[-1] in save_modules


def plan_extraction(base: str | Path, tuned: str | Path, *, embed_lora: bool = False,
                    save_modules: Sequence[str] = (), allow_pickle: bool = False) -> ExtractPlan:
    """Open BASE and TUNED and check that TUNED is a fine-tune of BASE's architecture: same model type,
    same tensor names, same shapes; then sort the tensors into LoRA targets and the rest."""
    base_path = check_model(base, allow_pickle)
    tuned_path = check_model(tuned, allow_pickle)
    if base_path == tuned_path:
        raise InputError(f"BASE and TUNED are the same folder ({base_path}); pass the fine-tuned model as TUNED")
    b, t = Checkpoint(base_path, allow_pickle), Checkpoint(tuned_path, allow_pickle)
    check_architectures([b, t], [str(base_path), str(tuned_path)], 0)
    if b.config.get("model_type") in CONV1D_MODEL_TYPES:
        raise InputError(f"{base_path} is a {b.config['model_type']} model, whose projections are transformers' "
                         "Conv1D (weights stored in x out), not nn.Linear; LoRA extraction supports decoders with "
                         "linear projections (Llama, Mistral, Qwen2, Gemma, Phi-3, ...)")
    only_base = sorted(set(b.records) - set(t.records))
    only_tuned = sorted(set(t.records) - set(b.records))
    if only_base or only_tuned:
        name, where, other = ((only_base[0], base_path, tuned_path) if only_base else
                              (only_tuned[0], tuned_path, base_path))
        raise InputError(f"tensor {name} is in {where} but not in {other} ({len(only_base) + len(only_tuned)} "
                         "tensors differ in name): TUNED must be a fine-tune of BASE with the same tensors (a tied "
                         "output head saved in one of them only? re-save both with the same tie_word_embeddings)")
    order = sorted(t.records, key=lambda n: (str(t.records[n].file), t.records[n].start))
    for name in order:
        rb, rt = b.records[name], t.records[name]
        if tuple(rb.shape) != tuple(rt.shape):
            raise InputError(f"tensor {name} has shape {list(rt.shape)} in {tuned_path} but {list(rb.shape)} in "
                             f"{base_path}: a LoRA delta needs equal shapes (a resized vocabulary? extract from a "
                             "base resized the same way)")
    modules = {module_of(n) for n in order}
    unknown = [m for m in save_modules if not any(_save_listed(x, [m]) for x in modules)]
    if unknown:
        raise InputError(f"--save-module {unknown[0]}: no module of {tuned_path} is named so (give a full module "
                         "name, e.g. model.norm, or its last part, e.g. lm_head)")
    plan = ExtractPlan(b, t, [], set(), [])
    for name in order:
        rec = t.records[name]
        module = module_of(name)
        vocab = vocab_axis(name) == 0
        linear = (len(rec.shape) == 2 and name.endswith(".weight") and rec.torch_dtype.is_floating_point
                  and b.records[name].torch_dtype.is_floating_point)
        if linear and (embed_lora or not vocab) and not _save_listed(module, save_modules):
            plan.targets.append(name)
            if vocab and not name.endswith(OUTPUT_HEADS):
                plan.embedding.add(name)
        else:
            plan.others.append(name)
    return plan


def check_rank_bound(plan: ExtractPlan, rank: int | str) -> None:
    """Refuse a fixed rank above every target's full rank min(out, in): it would only add zero columns."""
    if rank == "auto" or not plan.targets:
        return
    full = {n: min(plan.tuned.records[n].shape) for n in plan.targets}
    widest = max(full, key=full.get)
    if rank > full[widest]:
        raise InputError(f"--rank {rank} is above the full rank of every module (at most {full[widest]}, for "
                         f"{module_of(widest)} of shape {list(plan.tuned.records[widest].shape)}); use --rank "
                         f"{full[widest]} or less (--rank {full[widest]} is exact for every module)")


def _changed(b: torch.Tensor, t: torch.Tensor) -> float:
    """max |t - b| (0.0: bit-identical)."""
    if torch.equal(b, t):
        return 0.0
    return float((t.to(torch.float64) - b.to(torch.float64)).abs().max())


def sort_other_tensors(plan: ExtractPlan, save_modules: Sequence[str], skip_undecomposable: bool) -> None:
    """Compare every tensor that is not a LoRA target; decide which modules are saved whole, which skipped.

    Runs before any SVD, so that a change no adapter can carry is refused at once.
    """
    target_modules = {module_of(n) for n in plan.targets}
    by_module: dict[str, list[str]] = {}
    for name in plan.others:
        by_module.setdefault(module_of(name), []).append(name)
    changed: dict[str, float] = {}
    pairs = prefetch(lambda n: (plan.base.read(n), plan.tuned.read(n)), plan.others)
    for name, (b, t) in zip(plan.others, pairs):
        diff = _changed(b, t)
        if diff != diff or diff == math.inf:
            raise InputError(f"tensor {name} of {plan.tuned.path} or {plan.base.path} holds NaN or infinite values; "
                             "the model is damaged (or its training diverged)")
        if diff:
            changed[name] = diff
    for name, diff in changed.items():
        module = module_of(name)
        if module in target_modules and not skip_undecomposable:
            raise InputError(
                f"tensor {name} differs between BASE and TUNED (max abs change {diff:.3g}), but its module {module} "
                f"is a LoRA target: a LoRA delta B @ A changes only the weight (PEFT's lora_bias is one switch for "
                f"all targets and cannot be merged where a layer has no bias). Pass --save-module "
                f"{module.rsplit('.', 1)[-1]} to save those modules whole instead of as LoRA, or "
                "--skip-undecomposable to leave such changes out (they are reported)")
    for module, names in by_module.items():
        if module in target_modules:
            plan.skipped.update({n: changed[n] for n in names if n in changed})
        elif _save_listed(module, save_modules) or (not skip_undecomposable and any(n in changed for n in names)):
            plan.saved[module] = names
        else:
            plan.skipped.update({n: changed[n] for n in names if n in changed})
    if plan.saved:
        plan.notes.append(f"{len(plan.saved)} modules are saved whole from TUNED in modules_to_save ("
                          + ", ".join(sorted(plan.saved)[:4]) + (", ..." if len(plan.saved) > 4 else "")
                          + "): `medmerge adapters merge` refuses modules_to_save; PEFT loads and merges them")
    if plan.skipped:
        worst = max(plan.skipped, key=plan.skipped.get)
        plan.notes.append(f"--skip-undecomposable: {len(plan.skipped)} changed tensors that a LoRA cannot carry are "
                          f"left out (largest change {plan.skipped[worst]:.3g} in {worst}); the adapter does not "
                          "reproduce them")


def choose_rank(s2: torch.Tensor, rank: int | str, energy: Optional[float], max_rank: Optional[int]) -> int:
    """The rank kept for singular values whose squares are `s2` (float64, descending, some nonzero)."""
    if rank != "auto":
        return min(rank, s2.numel())
    cum = torch.cumsum(s2, 0)
    k = int(torch.searchsorted(cum, cum[-1] * (energy - ENERGY_SLACK))) + 1  # first k with cum[k-1] >= E total
    return min(k, s2.numel(), max_rank or s2.numel())


def lora_factors(delta: torch.Tensor, rank: int | str, energy: Optional[float], max_rank: Optional[int],
                 svd_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(A, B, info) with B @ A the best rank-k approximation of `delta`; the scale sqrt(S) is split between them.

    info: rank, full rank, energy kept and ||delta||_F (from the singular values, in float64).
    """
    u, s, vh = torch.linalg.svd(delta.to(svd_dtype), full_matrices=False)
    s2 = s.to(torch.float64).pow(2)
    k = choose_rank(s2, rank, energy, max_rank)
    total = float(s2.sum())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    info = {"rank": k, "full_rank": s.numel(), "energy_kept": float(s2[:k].sum()) / total,
            "delta_norm": math.sqrt(total)}
    return a, b, info


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int | str,
    energy: Optional[float] = None,
    max_rank: Optional[int] = None,
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
    dtype: str = "float32",
    svd_dtype: str = "float64",
    device: str = "auto",
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Extract a PEFT LoRA adapter of TUNED - BASE into OUT; return the record written to OUT/medmerge_extract.json."""
    rank = check_options(rank, energy, max_rank, dtype, svd_dtype)
    device = resolve_device(device)
    out = output_path(out).absolute()
    check_output(out, force, [base, tuned])
    save_modules = list(save_modules)
    plan = plan_extraction(base, tuned, embed_lora=embed_lora, save_modules=save_modules, allow_pickle=allow_pickle)
    try:
        check_rank_bound(plan, rank)
        sort_other_tensors(plan, save_modules, skip_undecomposable)
        inputs = [plan.base.path, plan.tuned.path]
        with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
            state, modules = _extract(plan, rank, energy, max_rank, getattr(torch, dtype), getattr(torch, svd_dtype),
                                      device, progress)
            if not modules and not plan.saved:
                raise InputError(f"{plan.tuned.path} holds the same weights as {plan.base.path}"
                                 + (" in every tensor a LoRA can carry" if plan.skipped else "")
                                 + ": there is no delta to extract")
            for names in plan.saved.values():
                for name in names:
                    state[f"{PREFIX}{name}"] = plan.tuned.read(name).contiguous()
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config(plan, modules), indent=2) + "\n")
            copy_support_files(plan.tuned.path, tmp, generation=False)
            record = _record(plan, modules, rank, energy, max_rank, embed_lora, save_modules, skip_undecomposable,
                             dtype, svd_dtype)
            (tmp / EXTRACT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        plan.close()
    return record


def _extract(plan: ExtractPlan, rank, energy, max_rank, dtype: torch.dtype, svd_dtype: torch.dtype, device: str,
             progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The LoRA factors of every changed target (PEFT key -> tensor), and each module's report."""
    state: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    pairs = prefetch(lambda n: (plan.base.read(n), plan.tuned.read(n)), plan.targets)
    with progress_bar(progress) as bar:
        task = bar.add_task("extracting LoRA", total=len(plan.targets))
        for name, (b, t) in zip(plan.targets, pairs):
            bar.advance(task)
            if torch.equal(b, t):
                continue
            delta = t.to(device, torch.float64) - b.to(device, torch.float64)  # exact for float32 and narrower
            if not torch.isfinite(delta).all():
                raise InputError(f"tensor {name} of {plan.tuned.path} or {plan.base.path} holds NaN or infinite "
                                 "values; the model is damaged (or its training diverged)")
            module = module_of(name)
            emb = name in plan.embedding
            a, b_, info = lora_factors(delta.T if emb else delta, rank, energy, max_rank, svd_dtype)
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            state[f"{PREFIX}{module}.{a_key}"] = a.to("cpu", dtype).contiguous()
            state[f"{PREFIX}{module}.{b_key}"] = b_.to("cpu", dtype).contiguous()
            modules[module] = {"shape": list(t.shape), **info, "embedding": emb}
    unchanged = len(plan.targets) - len(modules)
    if unchanged:
        plan.notes.append(f"{unchanged} of {len(plan.targets)} LoRA target weights are unchanged in TUNED and are "
                          "not in the adapter")
    capped = [m for m, i in modules.items() if rank != "auto" and i["rank"] < rank]
    if capped:
        plan.notes.append(f"{len(capped)} modules are narrower than --rank {rank} and keep their full rank "
                          f"(e.g. {capped[0]}: {modules[capped[0]]['rank']}); rank_pattern says so")
    return state, modules


def adapter_config(plan: ExtractPlan, modules: dict[str, dict]) -> dict:
    """PEFT's adapter_config.json: scaling 1 everywhere (lora_alpha = r, per module through the patterns)."""
    return peft_lora_config(plan.base.path, {m: i["rank"] for m, i in modules.items()},
                            modules_to_save=sorted(plan.saved) or None)


def _record(plan: ExtractPlan, modules: dict[str, dict], rank, energy, max_rank, embed_lora, save_modules,
            skip_undecomposable, dtype, svd_dtype) -> dict:
    norms2 = sum(i["delta_norm"] ** 2 for i in modules.values())
    kept2 = sum(i["energy_kept"] * i["delta_norm"] ** 2 for i in modules.values())
    ranks = [i["rank"] for i in modules.values()]
    return {
        "made_by": COMMAND,
        "base": {"path": str(plan.base.path), "fingerprint": fingerprint(plan.base.path)},
        "tuned": {"path": str(plan.tuned.path), "fingerprint": fingerprint(plan.tuned.path)},
        "extract": {
            "rank": rank, "energy": energy, "max_rank": max_rank, "embed_lora": embed_lora,
            "save_modules": list(save_modules), "skip_undecomposable": skip_undecomposable, "dtype": dtype,
            "svd_dtype": svd_dtype,
            "formula": "D = W_tuned - W_base = U S V^T; B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T, lora_alpha = r "
                       "(scaling 1); energy kept = sum_{i<k} s_i^2 / sum_i s_i^2",
        },
        "summary": {
            "modules": len(modules), "energy_kept": kept2 / norms2 if norms2 else 1.0,
            "min_energy_kept": min((i["energy_kept"] for i in modules.values()), default=1.0),
            "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
            "lora_parameters": sum(i["rank"] * sum(i["shape"]) for i in modules.values()),
            "modules_to_save": len(plan.saved), "skipped_tensors": len(plan.skipped),
        },
        "modules": modules,
        "modules_to_save": plan.saved,
        "skipped": plan.skipped,
        "notes": plan.notes,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions("peft", *RECORDED_LIBRARIES),
    }


def summary(record: dict, out: str | Path) -> str:
    """What an extraction did, in a few lines (the CLI prints the per-module table besides)."""
    s, x = record["summary"], record["extract"]
    how = f"rank auto (energy {x['energy']:g}" + (f", at most {x['max_rank']}" if x["max_rank"] else "") + ")" \
        if x["rank"] == "auto" else f"rank {x['rank']}"
    lines = [f"extracted {s['modules']} LoRA modules ({how}; ranks {s['rank_min']}-{s['rank_max']}) of "
             f"{record['tuned']['path']} - {record['base']['path']} into {out}",
             f"energy kept: {s['energy_kept']:.4f} overall, {s['min_energy_kept']:.4f} in the worst module"]
    lines += [f"note: {n}" for n in record.get("notes", [])]
    return "\n".join(lines)
