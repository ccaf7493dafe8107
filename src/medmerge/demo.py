"""The embedded default: build tiny models, merge them with several methods, verify.

(Until the synthetic clinical world exists, this is the main job of `make demo`.)
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .merge import merge
from .tiny import make_model
from .verify import verify

DEMO_METHODS = {
    "linear": {"models": [("clinical", {"weight": 0.5}), ("instruct", {"weight": 0.5})]},
    "slerp": {"base": "instruct", "models": [("instruct", {}), ("clinical", {})], "parameters": {"t": [0.2, 0.8]}},
    "task_arithmetic": {"base": "base", "models": [("clinical", {"weight": 0.6}), ("instruct", {"weight": 0.6})]},
    "ties": {"base": "base", "models": [("clinical", {"weight": 1.0, "density": 0.5}), ("instruct", {"weight": 1.0, "density": 0.5})]},
    "dare_ties": {"base": "base", "models": [("clinical", {"weight": 1.0, "density": 0.6}), ("instruct", {"weight": 1.0, "density": 0.6})]},
}


def demo_config(method: str, paths: dict[str, Path]) -> dict:
    spec = DEMO_METHODS[method]
    cfg = {
        "merge_method": method,
        "models": [{"model": str(paths[m]), **({"parameters": p} if p else {})} for m, p in spec["models"]],
        "dtype": "float32",
        "random_seed": 7,
    }
    if "base" in spec:
        cfg["base_model"] = str(paths[spec["base"]])
    if "parameters" in spec:
        cfg["parameters"] = spec["parameters"]
    return cfg


def run_demo(out: Path, force: bool = True) -> list[dict]:
    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = out / "models"
    base = models / "base"
    if not (base / "config.json").is_file():
        console.print("building tiny models (Llama-style, hidden 64, 2 layers)...")
        make_model(base, seed=0, hidden=64, layers=2, vocab=256)
        make_model(models / "clinical", base=base, seed=1)
        make_model(models / "instruct", base=base, seed=2)
    paths = {"base": base, "clinical": models / "clinical", "instruct": models / "instruct"}
    rows = []
    for method in DEMO_METHODS:
        target = out / "merges" / method
        result = merge(demo_config(method, paths), target, force=force, progress=False)
        report = verify(target)
        rows.append({
            "method": method, "tensors": result.stats.tensors, "seconds": result.stats.seconds,
            "verified": len(report.checked), "max_abs_error": max((c.max_abs for c in report.checked), default=0.0),
            "ok": report.ok,
        })
    table = Table(title=f"medmerge demo: merges in {out / 'merges'}")
    for col in ("method", "tensors", "merge s", "recomputed", "max abs error", "verified"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], str(r["tensors"]), f"{r['seconds']:.3f}", str(r["verified"]),
                      f"{r['max_abs_error']:.3g}", "yes" if r["ok"] else "NO")
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f}s")
    return rows
