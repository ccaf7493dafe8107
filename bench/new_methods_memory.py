#!/usr/bin/env python
"""Peak memory of `medmerge merge` with the subspace, PCB and data-aware methods on the Llama-3.2-1B shape.

The claim measured: tsv_m, iso_c, iso_cts, pcb, regmean and fisher stream, i.e. a merge's peak memory is a few
tensors plus their statistics, not the model's size. linear (streamed by row chunks) and ties (whole tensor)
are the reference points.

1. Inputs: a base and two "fine-tunes" (base + N(0, 0.001) noise) of the Llama-3.2-1B shape (hidden 2048,
   intermediate 8192, vocab 128256, 32/8 heads, tied embeddings, bf16) with `--layers` decoder layers instead of
   16, built by bench/merge_vs_mergekit.py's generator (cached under bench/_work/models/llama-3.2-1b-L<n>/).
   Every tensor shape of the 16-layer model is already present with 2 layers; runs with 2 and 4 layers show
   whether the peak grows with depth.
2. Statistics for regmean/fisher: synthetic folders in `medmerge stats`' format (same keys, shapes, record and
   model fingerprint; random values: a merge's memory does not depend on them), one per fine-tune and kind:
   `gram/<linear weight>` float32 [in, in] symmetric positive definite (X^T X / n of a random X for 2048-wide
   inputs; diagonally dominant for the 8192-wide down_proj inputs; q/k/v and gate/up share one matrix, as the
   real command stores them), no gram for the tied head; `fisher/<every tensor>` float32, positive, with the
   record's `fisher_norm`.
3. Runs each method as `medmerge merge CONFIG OUT --threads N` in a child process and records its wall time and
   peak RSS (GNU time's %M, plus sampled RssAnon/RssFile: merge_vs_mergekit.run_measured).
4. With `--stats-command`: the peak RSS of the real `medmerge stats` (`--kinds gram`, then `--kinds fisher`) on the
   base with a word-level tokenizer and 8 short records, and a check that its keys and shapes are the synthetic
   folders' keys and shapes.

    .venv/bin/python bench/new_methods_memory.py --layers 2 --threads 1 --stats-command
    .venv/bin/python bench/new_methods_memory.py --layers 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import _common  # bench/_common.py (the script's folder is on sys.path)
import merge_vs_mergekit as mvm  # checkpoints of real shapes, measured child processes

import torch

from medmerge.io.fingerprint import fingerprint
from medmerge.io.stats import FORMAT, STATS_RECORD, StatsFolder, expected_shape, stats_key
from medmerge.io.writer import OutTensor, ShardedWriter, atomic_output_dir, shard_size

ROOT, WORK, BIN = _common.ROOT, _common.WORK, mvm.BIN
SHAPE = "llama-3.2-1b"
METHODS = ("linear", "ties", "regmean", "fisher", "pcb", "iso_c", "tsv_m", "iso_cts")  # the SVD-heavy ones last
STATS_KIND = {"regmean": "gram", "fisher": "fisher"}
FINE_TUNES = ("ft1", "ft2")
STATS_VERSION = 1  # bump when the synthetic statistics change
# layers that read one input share a gram matrix (medmerge stats' _GramCollector): projection -> leader
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
GB = 1e9


def register_shape(layers: int) -> str:
    """The 1B shape with `layers` decoder layers, added to merge_vs_mergekit's shapes (so build_model makes it)."""
    name = f"{SHAPE}-L{layers}"
    mvm.SHAPES[name] = dict(mvm.SHAPES[SHAPE], num_hidden_layers=layers)
    return name


def inputs_of(method: str) -> tuple[str, ...]:
    return FINE_TUNES if method == "linear" or method in STATS_KIND else mvm.ROLES


# ----------------------------------------------------------------------------- synthetic statistics


def linear_weights(specs) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's linear-layer weights (what `medmerge stats --kinds gram` covers): the *_proj matrices;
    a tied head is no tensor of the checkpoint, and the embedding is no linear layer."""
    return sorted((n, s) for n, s in specs if len(s) == 2 and n.endswith("_proj.weight"))


def synthetic_gram(in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if in_features <= 4096:  # X^T X / n of a random X with twice as many rows as columns
        x = torch.randn(2 * in_features, in_features, generator=g)
        return (x.T @ x).div_(2 * in_features)
    a = torch.randn(in_features, in_features, generator=g).mul_(1e-5)  # |off-diagonal row sums| ~ 0.07 < 1
    gram = (a + a.T).mul_(0.5)
    gram.diagonal().add_(torch.rand(in_features, generator=g).add_(1.0))
    return gram


def stats_tensors(kind: str, specs, role: str):
    """(key, shape, make) of each statistic, in the order `medmerge stats` writes them (gram, then fisher)."""
    if kind == "gram":
        cache: dict[str, dict[str, torch.Tensor]] = {}

        def gram(name: str, in_features: int):
            prefix, proj = name.rsplit(".", 2)[0], name.split(".")[-2]
            leader = f"{prefix}.{SHARED_INPUT.get(proj, proj)}"
            if prefix not in cache:  # names are sorted: one module's layers are consecutive
                cache.clear()
                cache[prefix] = {}
            held = cache[prefix]
            if leader not in held:
                held[leader] = synthetic_gram(in_features, mvm.Pools._seed("gram", role, leader))
            return held[leader]

        return [(stats_key("gram", n), expected_shape("gram", s), lambda n=n, s=s: gram(n, s[1]))
                for n, s in linear_weights(specs)]

    def fisher(name: str, shape: tuple[int, ...]):
        g = torch.Generator().manual_seed(mvm.Pools._seed("fisher", role, name))
        return torch.rand(shape, generator=g).mul_(1e-6).add_(1e-10)

    return [(stats_key("fisher", n), tuple(s), lambda n=n, s=s: fisher(n, s)) for n, s in sorted(specs)]


def build_stats(shape_name: str, role: str, model: Path, kind: str) -> Path:
    """Write (or reuse) bench/_work/stats/<shape>/<role>-<kind>: a statistics folder for `model`."""
    out = WORK / "stats" / shape_name / f"{role}-{kind}"
    model_fp = fingerprint(model)
    record_file = out / STATS_RECORD
    if record_file.is_file():
        old = json.loads(record_file.read_text())
        if old.get("model_fingerprint") == model_fp and old.get("synthetic", {}).get("version") == STATS_VERSION:
            return out
    specs = mvm.tensor_specs(mvm.SHAPES[shape_name])
    todo = stats_tensors(kind, specs, role)
    t0, square_sum = time.perf_counter(), 0.0
    with atomic_output_dir(out, force=True) as tmp:
        writer = ShardedWriter(tmp, [OutTensor(k, torch.float32, s) for k, s, _ in todo], shard_size("5GB"),
                               metadata={"medmerge": "stats"})
        for key, _, make in todo:
            value = make()
            writer.begin(key)
            writer.write(value)
            if kind == "fisher":
                square_sum += float(value.double().square().sum())
            del value
        writer.close()
        record = {
            "format": FORMAT, "kinds": [kind], "model": str(model.resolve()), "model_fingerprint": model_fp,
            "data": None, "data_sha256": None, "records": 0, "limit": None, "seed": 0, "examples": 0, "tokens": 0,
            "trained_tokens": 0, "fisher_examples": None,
            "fisher_norm": square_sum ** 0.5 if kind == "fisher" else None,
            "max_length": None, "dtype": "float32", "device": "cpu",
            "shared_inputs": {n[: -len(".weight")]: n.rsplit(".", 2)[0] + "." + SHARED_INPUT[n.split(".")[-2]]
                              for n, _ in linear_weights(specs) if n.split(".")[-2] in SHARED_INPUT}
            if kind == "gram" else {},
            "synthetic": {"version": STATS_VERSION, "by": "bench/new_methods_memory.py",
                          "note": "random values of medmerge stats' keys, shapes and format (a merge's memory does "
                                  "not depend on the values)"},
        }
        (tmp / STATS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"built {out} ({size / GB:.2f} GB) in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------- configs and runs


def merge_config(method: str, paths: dict[str, Path], stats: dict[str, Path]) -> dict:
    if method in ("linear", "ties"):
        return mvm.merge_config(method, paths)
    if method in STATS_KIND:
        return {"merge_method": method, "dtype": "bfloat16", "models": [
            {"model": str(paths[r]), "parameters": {"stats": str(stats[f"{r}-{STATS_KIND[method]}"])}}
            for r in FINE_TUNES]}
    return {"merge_method": method, "base_model": str(paths["base"]), "dtype": "bfloat16",
            "models": [{"model": str(paths[r])} for r in FINE_TUNES]}


def measure(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """run_measured, plus the CPU steal and the load average meanwhile (other jobs share this machine)."""
    load0 = os.getloadavg()[0]
    r, steal = _common.steal_pct(lambda: mvm.run_measured(cmd, env, log, timeout))
    r.update(steal_pct=steal, loadavg_1min_before=round(load0, 2), loadavg_1min_after=round(os.getloadavg()[0], 2))
    return r


def real_stats(shape_name: str, base: Path, synthetic: dict[str, Path], env: dict, timeout: float) -> dict:
    """Peak RSS of the real `medmerge stats` on the base, one kind at a time, and its keys against ours."""
    from medmerge import tiny

    if not (base / "tokenizer.json").is_file():  # tokenizer files are not part of the fingerprint
        tiny.save_tokenizer(base, tiny.tokenizer_words(1024))
    words = tiny.tokenizer_words(1024)[4:]
    data = WORK / "stats" / shape_name / "calibration.jsonl"
    texts = [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(24 + 4 * i)) for i in range(8)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for kind in ("gram", "fisher"):
        folder = WORK / "stats" / shape_name / f"real-base-{kind}"
        cmd = [str(BIN / "medmerge"), "stats", str(base), "--data", str(data), "--out", str(folder), "--kinds", kind,
               "--force", "-q"]
        print(f"[{shape_name}] medmerge stats --kinds {kind} ...", flush=True)
        r = measure(cmd, env, WORK / "logs" / shape_name / f"stats-{kind}.log",
                    timeout)
        if r["rc"] == 0:
            real, ours = StatsFolder(folder), StatsFolder(synthetic[f"ft1-{kind}"])
            shapes = lambda f: {k: tuple(rec.shape) for k, rec in f.records.items()}  # noqa: E731
            r["same_keys_and_shapes_as_synthetic"] = shapes(real) == shapes(ours)
            r["tensors"], r["stats_bytes"] = len(real.records), folder_bytes(folder)
            r["shared_inputs_as_synthetic"] = real.record["shared_inputs"] == ours.record["shared_inputs"]
            real.close()
            ours.close()
            shutil.rmtree(folder, ignore_errors=True)
        print(f"    rc={r['rc']} wall={r['wall_s']}s peak_rss={r['peak_rss_bytes'] / GB:.2f} GB "
              f"keys/shapes as synthetic: {r.get('same_keys_and_shapes_as_synthetic')}", flush=True)
        out[kind] = r
    return out


# ----------------------------------------------------------------------------- table


def print_table(rows: list[dict], largest: dict) -> None:
    bf16, f32 = largest["bf16_bytes"], largest["float32_bytes"]
    head = ["method", "wall s", "peak RSS GB", "anon GB", "inputs GB (models + stats)", "largest tensor bf16 / f32 GB",
            "peak / largest f32", "peak / inputs"]
    lines = [head, ["---"] * len(head)]
    for r in rows:
        ok = r["rc"] == 0
        peak = r["peak_rss_bytes"]
        inputs = r["input_model_bytes"] + r["input_stats_bytes"]
        stats = f" + {r['input_stats_bytes'] / GB:.2f}" if r["input_stats_bytes"] else ""
        lines.append([r["method"], f"{r['wall_s']:.1f}" if ok else f"fail (rc {r['rc']})", f"{peak / GB:.2f}",
                      f"{r['sampled_peak_rss_anon_bytes'] / GB:.2f}", f"{r['input_model_bytes'] / GB:.2f}{stats}",
                      f"{bf16 / GB:.2f} / {f32 / GB:.2f}", f"{peak / f32:.1f}", f"{peak / inputs:.2f}"])
    for line in lines:
        print("| " + " | ".join(line) + " |")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 1B shape (16 in the real model)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the merges")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before a run is killed")
    ap.add_argument("--stats-command", action="store_true",
                    help="also measure the real `medmerge stats` (--kinds gram, then fisher) on the base")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    torch.set_num_threads(args.threads)

    name = register_shape(args.layers)
    s = mvm.SHAPES[name]
    specs = mvm.tensor_specs(s)
    largest_name, largest_shape = max(specs, key=lambda t: math.prod(t[1]))
    largest = {"name": largest_name, "shape": list(largest_shape), "bf16_bytes": math.prod(largest_shape) * 2,
               "float32_bytes": math.prod(largest_shape) * 4}
    pools_box: list = []
    paths = {r: mvm.build_model(name, r, pools_box) for r in mvm.ROLES}
    pools_box.clear()
    stats = {}
    if any(m in STATS_KIND for m in methods) or args.stats_command:
        for kind in ("gram", "fisher"):
            for r in FINE_TUNES:
                stats[f"{r}-{kind}"] = build_stats(name, r, paths[r], kind)

    env = _common.child_env(args.threads)
    cfg_root, out_root = WORK / "configs" / name, WORK / "out" / name
    cfg_root.mkdir(parents=True, exist_ok=True)
    results_file = WORK / f"new_methods-{name}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"shape": name, "shape_config": s, "model_bytes": mvm.model_bytes(s), "largest_tensor": largest,
                    "threads": args.threads, "machine": _common.machine_info(("torch", "medmerge", "safetensors",
                                                                              "transformers"))})
    results.setdefault("methods", {})
    import yaml

    rows = []
    for method in methods:
        roles = inputs_of(method)
        used_stats = [stats[f"{r}-{STATS_KIND[method]}"] for r in roles] if method in STATS_KIND else []
        cfg_file = cfg_root / f"{method}.yml"
        cfg_file.write_text(yaml.safe_dump(merge_config(method, paths, stats), sort_keys=False))
        mvm.warm([paths[r] for r in roles] + used_stats)
        out = out_root / method
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(BIN / "medmerge"), "merge", str(cfg_file), str(out), "--force", "-q", "--threads",
               str(args.threads), "--device", "cpu"]
        print(f"[{name}] {method} ...", flush=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        r = measure(cmd, env, WORK / "logs" / name / f"{method}.log", args.timeout)
        r.update(method=method, command=_common.shell(cmd), config=str(cfg_file.relative_to(ROOT)),
                 input_model_bytes=sum(folder_bytes(paths[x]) for x in roles),
                 input_stats_bytes=sum(folder_bytes(f) for f in used_stats), output_bytes=folder_bytes(out),
                 started=started, medmerge_commit=_common.git("rev-parse", "--short", "HEAD"))
        print(f"    rc={r['rc']} wall={r['wall_s']}s peak_rss={r['peak_rss_bytes'] / GB:.2f} GB "
              f"(anon {r['sampled_peak_rss_anon_bytes'] / GB:.2f}, file {r['sampled_peak_rss_file_bytes'] / GB:.2f}) "
              f"steal {r['steal_pct']}%", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        rows.append(r)
        results["methods"][method] = r
        results_file.write_text(json.dumps(results, indent=2))
    if args.stats_command:
        results["stats_command"] = real_stats(name, paths["base"], stats, env, args.timeout)
        results_file.write_text(json.dumps(results, indent=2))

    print(f"\n{name}: {args.layers} layers, {mvm.model_bytes(s) / GB:.2f} GB per model (bf16), {args.threads} "
          f"thread(s); largest tensor {largest_name} {largest_shape}")
    print_table(rows, largest)
    print(f"\nresults: {results_file}")


if __name__ == "__main__":
    sys.exit(main())
