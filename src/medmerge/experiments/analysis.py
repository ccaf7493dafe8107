"""The two-stage LoRA paper's analyses: decoding sensitivity and reasoning-trace leakage.

- `decoding_grid`: evaluate one model under several decoding settings (greedy;
  temperature/top-p pairs; repetition penalty) and tabulate and plot each metric
  per setting.
- `reasoning_leakage`: the share of generated outputs that contain a reasoning
  span (`<think>...</think>` by default; any regular expression), per model and
  setting, read from `medmerge eval --log-samples` output.

(The loss curves of several trainer runs are `plots.loss_curves`.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from ..evaluation import runner
from ..io.writer import check_output
from .plots import plot_decoding

DEFAULT_REASONING_PATTERN = r"<think>.*?</think>"
DEFAULT_SETTINGS = ("greedy", "t=0.6,p=0.8", "t=0.7,p=0.9", "rp=1.2")
_SHORT = {"t": "temperature", "p": "top_p", "rp": "repetition_penalty", "k": "top_k"}


@dataclass(frozen=True)
class DecodingSetting:
    name: str
    kwargs: dict

    @property
    def gen_kwargs(self) -> dict:
        return dict(self.kwargs)


def parse_setting(spec: str | dict) -> DecodingSetting:
    """'greedy', 't=0.6,p=0.8', 'rp=1.2', or a dict {name?, temperature, top_p, repetition_penalty, ...}."""
    if isinstance(spec, dict):
        kw = {k: v for k, v in spec.items() if k != "name"}
        name = spec.get("name") or _name(kw)
    else:
        text = str(spec).strip()
        if text in ("greedy", ""):
            return DecodingSetting("greedy", {"do_sample": False})
        kw = {}
        for part in text.split(","):
            if "=" not in part:
                raise InputError(f"decoding setting {text!r}: use greedy or KEY=VALUE pairs such as t=0.6,p=0.8,rp=1.1")
            k, v = (s.strip() for s in part.split("=", 1))
            try:
                kw[_SHORT.get(k, k)] = float(v) if "." in v or "e" in v.lower() else int(v)
            except ValueError:
                raise InputError(f"decoding setting {text!r}: {k}={v} is not a number") from None
        name = text
    sampling = kw.get("temperature", 0) not in (0, None) or "top_p" in kw or "top_k" in kw
    kw.setdefault("do_sample", bool(sampling))
    return DecodingSetting(name, kw)


def _name(kw: dict) -> str:
    inv = {v: k for k, v in _SHORT.items()}
    return ",".join(f"{inv.get(k, k)}={v}" for k, v in kw.items() if k != "do_sample") or "greedy"


def decoding_grid(model, settings: Sequence[str | dict], tasks: Sequence[str], out: str | Path, *,
                  max_new_tokens: Optional[int] = None, reasoning_pattern: str = DEFAULT_REASONING_PATTERN,
                  force: bool = False, **eval_kwargs) -> dict:
    """Evaluate `model` once per decoding setting into OUT/<setting>/; write OUT/decoding.{json,md,png}."""
    out = Path(out).absolute()
    check_output(out, force)
    parsed = [parse_setting(s) for s in settings]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise InputError(f"decoding settings repeat a name: {names}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in parsed:
        gen = s.gen_kwargs
        if max_new_tokens:
            gen["max_new_tokens"] = max_new_tokens
        folder = out / _slug(s.name)
        res = runner.evaluate(model, tasks, folder, gen_kwargs=gen, log_samples=True, force=True, **eval_kwargs)
        leak = reasoning_leakage({s.name: folder}, reasoning_pattern)[s.name]
        rows.append({"setting": s.name, "gen_kwargs": gen, "metrics": flat_metrics(res),
                     "reasoning_leakage": leak})
    report = {"model": str(getattr(model, "name_or_path", model)), "tasks": list(tasks), "settings": rows,
              "reasoning_pattern": reasoning_pattern}
    (out / "decoding.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "decoding.md").write_text(decoding_table(report) + "\n")
    plot_decoding(report, out / "decoding.png")
    return report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def flat_metrics(results: dict) -> dict[str, float]:
    """{'task/metric': value} of a medmerge results dict (numbers only, no stderr)."""
    out = {}
    for task, metrics in results.get("tasks", {}).items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr"):
                out[f"{task}/{k}"] = float(v)
    return out


def decoding_table(report: dict, keys: Optional[Sequence[str]] = None) -> str:
    keys = list(keys or sorted({k for r in report["settings"] for k in r["metrics"]}))
    lines = ["| setting | " + " | ".join(keys) + " | reasoning leakage |", "|---" * (len(keys) + 2) + "|"]
    for r in report["settings"]:
        leak = r["reasoning_leakage"]
        lines.append(f"| {r['setting']} | " + " | ".join(f"{r['metrics'].get(k, float('nan')):.3f}" for k in keys)
                     + f" | {leak['rate']:.3f} ({leak['matches']}/{leak['outputs']}) |")
    return "\n".join(lines)


def reasoning_leakage(runs: dict[str, str | Path], pattern: str = DEFAULT_REASONING_PATTERN) -> dict[str, dict]:
    """For each labelled eval folder (with samples/*.jsonl): outputs with a reasoning span, total, rate, per task."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise InputError(f"reasoning pattern {pattern!r} is not a regular expression: {e}") from None
    out = {}
    for label, folder in runs.items():
        samples = Path(folder) / "samples"
        if not samples.is_dir():
            raise InputError(f"{folder} has no samples/ folder: evaluate with --log-samples to count reasoning spans")
        per_task, total, hits = {}, 0, 0
        for file in sorted(samples.glob("*.jsonl")):
            n = m = 0
            with open(file, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    if "options" in rec or "option_loglikelihoods" in rec:  # multiple choice: nothing generated
                        continue
                    resp = rec.get("response")
                    if not isinstance(resp, str):
                        continue
                    n += 1
                    m += bool(rx.search(resp))
            if n:
                per_task[file.stem] = {"matches": m, "outputs": n, "rate": m / n}
                total += n
                hits += m
        out[label] = {"matches": hits, "outputs": total, "rate": hits / total if total else 0.0, "tasks": per_task}
    return out


