"""The two-stage LoRA paper's analyses: decoding sensitivity, reasoning-trace leakage, loss curves.

- `decoding_grid`: evaluate one model under several decoding settings (greedy;
  temperature/top-p pairs; repetition penalty) and tabulate and plot each metric
  per setting.
- `reasoning_leakage`: the share of generated outputs that contain a reasoning
  span (`<think>...</think>` by default; any regular expression), per model and
  setting, read from `medmerge eval --log-samples` output.
- `loss_curves`: the training (and eval, where logged) loss of several trainer
  runs in one plot, from their `train_log.jsonl`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError

DEFAULT_REASONING_PATTERN = r"<think>.*?</think>"
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
    from .evaluation.runner import evaluate
    from .io.writer import check_output

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
        res = evaluate(model, tasks, folder, gen_kwargs=gen, log_samples=True, force=True, **eval_kwargs)
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


def plot_decoding(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in report["settings"] for k in r["metrics"]})
    names = [r["setting"] for r in report["settings"]]
    cols = min(3, max(1, len(keys)))
    nrows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.bar(range(len(names)), [r["metrics"].get(key, 0.0) for r in report["settings"]], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"decoding sensitivity: {Path(report['model']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "train_log.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no train_log.jsonl (written by `medmerge train`)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curves(runs: dict[str, str | Path], path: str | Path, title: str = "training loss") -> Path:
    """One plot with every run's training loss (solid) and eval loss (dashed, where logged) against its step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, run) in enumerate(runs.items()):
        rows = read_log(run)
        color = f"C{i}"
        train = [r for r in rows if r.get("loss") is not None]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{label} (train)")
        ev = [r for r in rows if r.get("eval_loss") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], color=color, linestyle="--",
                    label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
