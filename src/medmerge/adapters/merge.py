"""`medmerge adapters merge`: W = W0 + sum_i w_i dW_i, exported as full weights or as an adapter.

The inputs are opened and checked before any tensor is computed: every adapter
is plain LoRA, every module exists in the base with the right shape, all
adapters were trained on this base (the fingerprint `medmerge train` records;
else the base configs), all adapters have the same modules (or
`allow_missing`). `as_="full"` then streams the base tensor by tensor into the
merge engine's sharded writer (one tensor in memory at a time), adds the
combined delta to each target, and verifies the written folder against a
fresh recomputation before moving it into place. `as_="adapter"` writes a PEFT
adapter: `cat` (rank sum r_i, exact), or a rank-R SVD with the discarded energy
reported per module and overall.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import yaml

from ..errors import InputError, MedmergeError
from ..io.checkpoint import Checkpoint, resolve_model_path
from ..io.fingerprint import fingerprint
from ..io.writer import (
    OutTensor,
    ShardedWriter,
    atomic_output_dir,
    check_output,
    parse_size,
)
from ..provenance import TOKENIZER_FILES, library_versions, sha256_file
from .combine import DENSITY_METHODS, LINEAR_METHODS, METHODS, combine, svd_factors
from .lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, LoraAdapter, LoraModule

RECORD_KEY = "adapter_merge"
SAMPLE_MODULES = 8  # modules recomputed from the inputs by the merge's own verification (all with verify="full")
_CONFIG_IGNORE = ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "use_cache", "architectures")


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """'PATH:WEIGHT' -> (PATH, WEIGHT); a path without ':WEIGHT' gets weight 1."""
    path, sep, weight = str(text).rpartition(":")
    if not sep:
        return str(text), 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise InputError(f"--adapter {text!r}: the part after the last ':' must be a weight (e.g. sft:0.7)") from None


@dataclass
class AdapterInputs:
    """The opened base and adapters, with every check done."""

    base: Checkpoint
    adapters: list[LoraAdapter]
    weights: list[float]
    modules: dict[str, list[Optional[str]]]  # base tensor -> module name in each adapter (None: missing)
    notes: list[str] = field(default_factory=list)

    def deltas(self, target: str) -> list[Optional[torch.Tensor]]:
        """Each adapter's delta for base tensor `target`, in the weight's orientation (None: missing)."""
        return [None if m is None else a.delta(m) for a, m in zip(self.adapters, self.modules[target])]

    def first_module(self, target: str) -> LoraModule:
        """The module of the first adapter that has `target` (all share its orientation)."""
        return next(a.modules[m] for a, m in zip(self.adapters, self.modules[target]) if m is not None)

    def stacked_factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(A_cat, B_cat, transpose) with B_cat @ A_cat = sum_i w_i s_i B_i A_i: the `cat` factors.

        A_cat stacks the A_i (rank sum r_i); B_cat holds w_i s_i B_i side by side (the
        scalings are folded into the small factor). The weight's delta is B_cat @ A_cat,
        transposed when `transpose` (embedding LoRA, fan_in_fan_out).
        """
        As, Bs, transpose = [], [], False
        for a, m, w in zip(self.adapters, self.modules[target], self.weights):
            if m is None:
                continue
            fa, fb = a.factors(m)
            As.append(fa)
            Bs.append(fb.mul_(w * a.modules[m].scaling))
            transpose = a.modules[m].transpose
        return torch.cat(As, dim=0), torch.cat(Bs, dim=1), transpose

    def merged_weight(self, target: str, w0: torch.Tensor, method: str, density, seed: int) -> torch.Tensor:
        """W0 + the combined delta, in float32 (a fresh tensor; `w0` is not modified).

        The linear methods (exact, cat, svd) compute it as one fused W0 + B_cat @ A_cat
        (`addmm`): no per-adapter full-size delta is ever formed.
        """
        w0f = w0.to(torch.float32)
        if method in LINEAR_METHODS:
            a, b, transpose = self.stacked_factors(target)
            return torch.addmm(w0f, a.T, b.T) if transpose else torch.addmm(w0f, b, a)
        d = combine(self.deltas(target), self.weights, method, density, seed, _module(target))
        return d.add_(w0f)

    def close(self) -> None:
        self.base.close()


def open_inputs(base: str | Path, adapters: Sequence[tuple[str | Path, float]], *, allow_missing: bool = False,
                allow_pickle: bool = False, check_base: bool = True) -> AdapterInputs:
    if not adapters:
        raise InputError("pass at least one --adapter PATH:WEIGHT")
    base_path = resolve_model_path(str(base))
    if (base_path / CONFIG_NAME).is_file():
        raise InputError(f"--base {base_path} is an adapter; pass the base model the adapters were trained on")
    ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
    opened = [LoraAdapter(p, allow_pickle=allow_pickle) for p, _ in adapters]
    weights = [float(w) for _, w in adapters]
    for w, (p, _) in zip(weights, adapters):
        if not math.isfinite(w):
            raise InputError(f"adapter {p}: weight {w} is not a finite number")
    inputs = AdapterInputs(ckpt, opened, weights, {})
    for a in opened:
        for m in a.modules.values():
            rec = ckpt.records.get(m.target)
            if rec is None:
                raise InputError(f"adapter {a.path} was trained for another base: its module {m.name} has no weight "
                                 f"{m.target} in {base_path} (pass the base model the adapter was trained on)")
            if tuple(rec.shape) != m.delta_shape:
                raise InputError(f"adapter {a.path} was trained for another base: module {m.name} gives a delta of "
                                 f"shape {list(m.delta_shape)} but {m.target} in {base_path} has shape "
                                 f"{list(rec.shape)} (pass the base model the adapter was trained on)")
            if not rec.torch_dtype.is_floating_point:
                raise InputError(f"{m.target} in {base_path} is {rec.dtype}, not floating point: quantised bases "
                                 "cannot take an exact delta; pass the unquantised base")
    for a in opened:
        for target in a.saved_base:
            if target not in ckpt.records or not torch.equal(a.saved_base_weight(target),
                                                             ckpt.read(target).to(torch.float32)):
                raise InputError(f"adapter {a.path} saves its own copy of {target} (PEFT's save_embedding_layers), "
                                 f"which differs from {base_path}'s (a resized vocabulary?): merge it with the base "
                                 "it saved, not as a LoRA delta")
    targets = sorted({m.target for a in opened for m in a.modules.values()})
    by_target = [{m.target: m.name for m in a.modules.values()} for a in opened]
    for t in targets:
        inputs.modules[t] = [bt.get(t) for bt in by_target]
        missing = [str(a.path) for a, m in zip(opened, inputs.modules[t]) if m is None]
        if missing and not allow_missing:
            raise InputError(f"module {t.removesuffix('.weight')} is in some adapters but not in {', '.join(missing)}; "
                             "the adapters target different modules. Pass --allow-missing to treat a missing module "
                             "as dW = 0")
    n_missing = sum(m is None for ms in inputs.modules.values() for m in ms)
    if n_missing:
        inputs.notes.append(f"--allow-missing: {n_missing} (adapter, module) pairs are missing and count as dW = 0")
    if check_base:
        inputs.notes += check_same_base(base_path, opened)
    return inputs


def check_same_base(base_path: Path, adapters: Sequence[LoraAdapter]) -> list[str]:
    """Raise when an adapter was trained on another base; return notes on what could be checked.

    First choice: the base fingerprint `medmerge train` recorded (sha256 over the
    base's weights and configs), compared with this base's. Otherwise the
    adapter's `base_model_name_or_path`: when it is a local folder, its
    config.json must match this base's (architecture fields).
    """
    notes = []
    recorded = {str(a.path): a.recorded_base_fingerprint for a in adapters}
    have = {p: f for p, f in recorded.items() if f}
    mine = None
    if have:
        mine = fingerprint(base_path)
        for p, f in have.items():
            if f != mine:
                raise InputError(f"adapter {p} was trained on another base: its recorded base fingerprint "
                                 f"{f[:12]}... differs from {base_path}'s {mine[:12]}... (pass the base it was trained "
                                 "on; --no-base-check skips this check)")
    base_config = _arch_config(base_path / "config.json")
    for a in adapters:
        if str(a.path) in have:
            continue
        name = a.base_name
        folder = Path(name).expanduser() if name else None
        if folder is not None and (folder / "config.json").is_file():
            if _arch_config(folder / "config.json") != base_config:
                raise InputError(f"adapter {a.path} was trained on another base, {folder}, whose config.json differs from "
                                 f"{base_path}'s; pass the base it was trained on (--no-base-check skips this check)")
            if folder.resolve() != base_path.resolve():
                # another local folder with the same architecture: same weights?
                if fingerprint(folder) != (mine := mine or fingerprint(base_path)):
                    raise InputError(f"adapter {a.path} was trained on another base, {folder}, whose weights differ from "
                                     f"{base_path}'s (same architecture, other fingerprint); pass the base it was "
                                     "trained on (--no-base-check skips this check)")
                notes.append(f"adapter {a.path}: trained on {folder}, which holds the same weights as {base_path}")
            else:
                notes.append(f"adapter {a.path}: no recorded base fingerprint; trained on this base folder")
        else:
            notes.append(f"adapter {a.path}: no recorded base fingerprint and its base {name!r} is not a local "
                         "folder; only module names and shapes were checked")
    return notes


def _arch_config(file: Path) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in cfg.items() if k not in _CONFIG_IGNORE}


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
    out = Path(out).absolute()
    check_output(out, force)
    out_dtype = None
    if dtype is not None:
        out_dtype = getattr(torch, dtype, None)
        if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
            raise InputError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    inputs = open_inputs(base, adapters, allow_missing=allow_missing, allow_pickle=allow_pickle,
                         check_base=check_base)
    if method == "exact" and as_ == "adapter":
        method_used = "cat"
        inputs.notes.append("--method exact --as adapter writes the exact concatenated adapter (cat)")
    else:
        method_used = method
    try:
        with atomic_output_dir(out, force=force) as tmp:
            record = _record(inputs, method_used, as_, density, rank, seed, out_dtype)
            record[RECORD_KEY]["allow_missing"] = allow_missing
            checksums = None
            if as_ == "full":
                results, checksums = _write_full(inputs, tmp, method_used, density, seed, out_dtype,
                                                 parse_size(shard_size), progress)
            else:
                results, record["rank"] = _write_adapter(inputs, tmp, method_used, density, rank, seed, progress)
            record["stats"] = _stats(results)
            record["notes"] = inputs.notes
            _write_record(tmp, record)
            if verify:
                from .verify import verify_adapter_merge

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
            "dtype": str(out_dtype).replace("torch.", "") if out_dtype else None,
            "formula": "W = W0 + sum_i w_i dW_i, dW_i = s_i B_i A_i (s_i = lora_alpha/r, or /sqrt(r) with rslora)",
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
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


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


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


def write_transformed(base: Checkpoint, folder: Path, transform, *, out_dtype, shard_size: int, description: str,
                      metadata: dict, progress: bool) -> dict[str, int]:
    """Stream `base` into `folder` as sharded safetensors, writing transform(name, W0) for every tensor.

    Reads run ahead in a thread and writes happen in another, in order, one tensor at a time; the config
    and tokenizer files are copied. Returns every written tensor's CRC-32 (for `readback_problems`).
    """
    order = sorted(base.records.values(), key=lambda r: (str(r.file), r.start))
    tensors = [OutTensor(r.name, out_dtype if (out_dtype and r.torch_dtype.is_floating_point) else r.torch_dtype,
                         tuple(r.shape)) for r in order]
    writer = ShardedWriter(folder, tensors, shard_size, metadata=metadata)
    checksums: dict[str, int] = {}

    def write(name: str, w: torch.Tensor) -> None:
        writer.begin(name)
        writer.write(w)
        checksums[name] = checksum(w)

    with _progress(progress) as bar, ThreadPoolExecutor(1) as io:
        task = bar.add_task(description, total=len(tensors))
        written = None
        for t, w0 in zip(tensors, prefetch(base.read, [t.name for t in tensors])):
            w = transform(t.name, w0).to(t.dtype)
            if written is not None:
                written.result()  # in order, one tensor at a time
            written = io.submit(write, t.name, w)
            bar.advance(task)
        if written is not None:
            written.result()
    writer.close()
    _copy_support(base, folder, out_dtype)
    return checksums


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (as the writer stores them)."""
    import zlib

    t = t.detach().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def readback_problems(folder: Path, checksums: dict[str, int]) -> list[str]:
    """Every tensor as read back from the written files has the bytes that were computed."""
    out = Checkpoint(folder)
    names = list(checksums)
    problems = [f"tensor {n} read back from {folder} differs from what was written (CRC-32)"
                for n, t in zip(names, prefetch(out.read, names)) if checksum(t) != checksums[n]]
    out.close()
    return problems


def sample_targets(inputs: AdapterInputs, k: int, seed: int) -> set[str]:
    """`k` targeted tensors for the in-merge recomputation: one per module kind first, then random."""
    import random

    targets = sorted(inputs.modules)
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {}
    for t in targets:
        by_kind.setdefault(t.rsplit(".", 2)[-2], []).append(t)
    chosen = {rng.choice(v) for v in by_kind.values()}
    rest = [t for t in targets if t not in chosen]
    chosen |= set(rng.sample(rest, max(0, min(k - len(chosen), len(rest)))))
    return chosen


def prefetch(read, names: Sequence[str], depth: int = 2) -> Iterator[torch.Tensor]:
    """read(name) for each name, in order, with up to `depth` reads running ahead in a thread
    (file reads release the GIL, so reading overlaps computing); memory: `depth` tensors."""
    with ThreadPoolExecutor(1) as pool:
        queue: deque = deque()
        for name in names[:depth]:
            queue.append(pool.submit(read, name))
        for i in range(len(names)):
            value = queue.popleft().result()
            if i + depth < len(names):
                queue.append(pool.submit(read, names[i + depth]))
            yield value


def _module(target: str) -> str:
    return target.removesuffix(".weight")


def _copy_support(base: Checkpoint, folder: Path, out_dtype) -> None:
    config = dict(base.config)
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base.path / name).is_file():
            shutil.copy2(base.path / name, folder / name)


def adapter_factors(inputs: AdapterInputs, target: str, method: str, density, rank: Optional[int],
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, ModuleResult]:
    """(A, B) of the exported adapter for one module, in PEFT's orientation (scaling 1)."""
    result = ModuleResult(target)
    if method == "cat":
        fa, fb, _ = inputs.stacked_factors(target)
        return fa, fb, result
    # factor orientation: B @ A, i.e. the transpose of the weight delta for embedding / fan_in_fan_out
    combined = combine(inputs.deltas(target), inputs.weights, method, density, seed, _module(target))
    if inputs.first_module(target).transpose:
        combined = combined.T.contiguous()
    fa, fb, _, norm = svd_factors(combined, rank)
    result.residual = float(torch.linalg.matrix_norm((combined - fb @ fa).to(torch.float64)))
    result.norm = norm
    return fa, fb, result


def default_rank(inputs: AdapterInputs) -> int:
    """sum of the adapters' ranks (the largest over modules): the rank of the exact combination."""
    return max(sum(a.modules[m].r for a, m in zip(inputs.adapters, names) if m is not None)
               for names in inputs.modules.values())


def _write_adapter(inputs: AdapterInputs, folder: Path, method: str, density, rank: Optional[int], seed: int,
                   progress: bool) -> tuple[list[ModuleResult], int]:
    from safetensors.torch import save_file

    if method != "cat" and rank is None:
        rank = default_rank(inputs)
    state, ranks, results = {}, {}, []
    first_cfg = inputs.adapters[0].config
    with _progress(progress) as bar:
        task = bar.add_task("merging adapters", total=len(inputs.modules))
        for target in inputs.modules:
            fa, fb, res = adapter_factors(inputs, target, method, density, rank, seed)
            results.append(res)
            module = _module(target)
            emb = inputs.first_module(target).a.name.endswith("lora_embedding_A")
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
            state[f"{PREFIX}{module}.{a_key}"] = fa.contiguous()
            state[f"{PREFIX}{module}.{b_key}"] = fb.contiguous()
            ranks[module] = fa.shape[0]
            bar.advance(task)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}  # PEFT matches keys as regexes
    config = {
        "peft_type": "LORA", "task_type": first_cfg.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": str(inputs.base.path), "r": common, "lora_alpha": common,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False, "lora_dropout": 0.0,
        "target_modules": sorted(_module(t) for t in inputs.modules), "bias": "none",
        "fan_in_fan_out": bool(first_cfg.get("fan_in_fan_out", False)), "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        src = inputs.adapters[0].path / name
        if src.is_file():
            shutil.copy2(src, folder / name)
    return results, (rank if rank is not None else common)
