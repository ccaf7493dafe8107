"""What the benchmark scripts share: child-process environment, git state, machine description."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"


def child_env(threads: int) -> dict:
    """Offline, CPU-only, `threads` BLAS/OpenMP threads, a private HF cache."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(WORK / "hf_home"), "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
    })
    return env


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info(packages: tuple[str, ...]) -> dict:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text().splitlines(), Path("/proc/meminfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal")), 0)
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "python": platform.python_version(), **versions,
            "medmerge_commit": git("rev-parse", "--short", "HEAD"),
            "medmerge_src_dirty": bool(git("status", "--porcelain", "--", "src"))}


def run_timed(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run a child process with its output in `log`; wall time and its own CPU time (from wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(WORK))
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            raise
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if wall > timeout:
        print(f"    warning: took {wall:.0f}s, more than --timeout {timeout:.0f}s", flush=True)
    return {"rc": rc, "wall_s": round(wall, 3), "user_s": round(usage.ru_utime, 2),
            "sys_s": round(usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "log": str(log.relative_to(ROOT))}


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def fmt(v, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def steal_pct(fn) -> tuple[object, float | None]:
    """Run fn(); CPU steal as % of all CPU time meanwhile (from /proc/stat)."""

    def read():
        try:
            vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            return vals[7], sum(vals)
        except (OSError, ValueError, IndexError):
            return None

    a = read()
    out = fn()
    b = read()
    if not a or not b or b[1] == a[1]:
        return out, None
    return out, round(100.0 * (b[0] - a[0]) / (b[1] - a[1]), 1)
