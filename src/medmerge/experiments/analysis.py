"""The two-stage LoRA paper's analyses: decoding sensitivity and reasoning-trace leakage.

- `decoding_grid`: evaluate one model under several decoding settings (greedy;
  temperature/top-p pairs; repetition penalty) and tabulate and plot each metric
  per setting.
- `reasoning_leakage`: the share of generated outputs that contain a reasoning
  span (`<think>...</think>` by default; any regular expression), per model and
  setting, read from `medmerge eval --log-samples` output.

(The loss curves of several trainer runs are `plots.loss_curves`; `loss_plot` checks the logs and
the output file first.) The single-file outputs (`--out PLOT`, `--json FILE`) are checked before any
work: their folder must exist, a folder or another kind of file is refused, an existing file is
replaced only with `--force` and only when it is an earlier output of the same kind (never a model,
config or results file), and the file is written beside and moved into place.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError, OutputExistsError
from ..evaluation import runner
from ..io.paths import under
from ..io.writer import check_output
from ..io.records import DataError
from .plots import loss_curves, plot_decoding

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
    check_output(out, force, [model] if isinstance(model, (str, Path)) else [])
    parsed = [parse_setting(s) for s in settings]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise InputError(f"decoding settings repeat a name: {names}")
    slugs: dict[str, str] = {}
    for name in names:  # two names, one folder: the second evaluation would replace the first's
        other = slugs.setdefault(_slug(name), name)
        if other != name:
            raise InputError(f"decoding settings {other!r} and {name!r} would share the folder {_slug(name)}; "
                             "name them apart (letters, digits and _ . = -)")
    gens = []
    for s in parsed:
        gen = s.gen_kwargs
        if max_new_tokens:
            gen["max_new_tokens"] = max_new_tokens
        gens.append(gen)
    # every setting checked (model, tasks, data, generation settings) before OUT is created
    accepted = inspect.signature(runner.check_request).parameters
    check_kw = {k: v for k, v in eval_kwargs.items() if k in accepted and k not in ("plan", "gen_kwargs")}
    plan = eval_kwargs.get("plan")
    for gen in gens:
        plan = runner.check_request(model, tasks, None, gen_kwargs=gen, plan=plan, **check_kw).plan
    eval_kwargs = {**eval_kwargs, "plan": plan}
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, gen in zip(parsed, gens):
        folder = under(out, _slug(s.name), what="decoding setting")
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
            for _, rec in _jsonl_rows(file, "a sample written by `medmerge eval --log-samples`"):
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


def _jsonl_rows(path: Path, what: str):
    """The JSON objects of a JSONL file, one per non-blank line; a bad line is an error naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected JSON lines, each {what}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); each line must be {what}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object ({what}), got {type(row).__name__}")
        yield lineno, row


# --- single-file outputs: `analyze loss --out PLOT`, `analyze leakage --json FILE` -----------------------

PLOT_KINDS = {".png": (b"\x89PNG", "a PNG image"), ".pdf": (b"%PDF", "a PDF"), ".svg": (b"<?xml", "an SVG image")}


def _not_plot(path: Path) -> Optional[str]:
    """None when `path` is an image of the kind its suffix names; else that kind."""
    magic, kind = PLOT_KINDS[path.suffix.lower()]
    with open(path, "rb") as f:
        head = f.read(64)
    ok = head.startswith(magic) or (path.suffix.lower() == ".svg" and head.lstrip().startswith(b"<svg"))
    return None if ok else kind


def _not_leakage_report(path: Path) -> Optional[str]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    ok = isinstance(report, dict) and all(
        isinstance(r, dict) and {"matches", "outputs", "rate", "tasks"} <= set(r) for r in report.values())
    return None if ok else "an earlier leakage report"


def check_file_output(path: str | Path, force: bool, *, flag: str, suffixes: Sequence[str], kind: str,
                      not_kind) -> Path:
    """A single output file: its folder exists; not a folder; an existing file replaced only with `force` and
    only when it is an earlier output of this `kind` (`not_kind(path)` is None; else it says what it should
    be), so never a model, config or results file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; pass a file name, e.g. {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + (" or " if len(suffixes) > 1 else "") + suffixes[-1]
        raise InputError(f"{flag} {path}: the file name must end in {names}, the formats the {kind} is written in; "
                         f"e.g. {path.with_suffix(suffixes[0]).name}")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    if path.exists():
        if not force:
            raise OutputExistsError(f"{flag} {path} exists; pass --force to replace it")
        expected = not_kind(path)
        if expected:
            raise InputError(f"{flag} {path} exists and is not {expected}; --force replaces only an earlier "
                             f"{kind}, never another file: choose another file name")
    return path


def replace_file(path: Path, write) -> None:
    """`write(tmp)` into a temporary file beside `path`, then moved onto `path` (an existing one is kept on failure)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_loss_log(run: str | Path) -> Path:
    """A run's train_log.jsonl, every line checked: JSON objects, each loss with a numeric step."""
    path = Path(run)
    if path.is_dir():
        path = path / "train_log.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no train_log.jsonl (written by `medmerge train`); pass a training output folder "
                         "or its train_log.jsonl")
    losses = 0
    for lineno, row in _jsonl_rows(path, "a row of `medmerge train`'s log"):
        for key in ("loss", "eval_loss"):
            value = row.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{path}, line {lineno}: {key} is {value!r}, not a number")
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                raise DataError(f"{path}, line {lineno}: a {key} without a 'step' (a number); is this the log "
                                "`medmerge train` writes?")
            losses += 1
    if not losses:
        raise DataError(f"{path} holds no loss: the run logged no training step yet; leave it out or train it")
    return path


def loss_plot(runs: dict[str, str | Path], out: str | Path, title: str = "training loss", *,
              force: bool = False) -> Path:
    """`plots.loss_curves` of the labelled runs into the file OUT, with the logs and OUT checked first."""
    out = check_file_output(out, force, flag="--out", suffixes=tuple(PLOT_KINDS), kind="plot",
                            not_kind=_not_plot)
    if not runs:
        raise InputError("pass at least one training run (a folder or train_log.jsonl, as PATH or LABEL=PATH)")
    logs = {label: check_loss_log(run) for label, run in runs.items()}
    replace_file(out, lambda tmp: loss_curves(logs, tmp, title))
    return out


def write_leakage_json(report: dict, out: str | Path, *, force: bool = False) -> Path:
    out = check_leakage_json(out, force)
    replace_file(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return out


def check_leakage_json(out: str | Path, force: bool) -> Path:
    return check_file_output(out, force, flag="--json", suffixes=(".json",), kind="leakage report",
                             not_kind=_not_leakage_report)


def check_deltas_json(out: str | Path, force: bool) -> Path:
    return check_file_output(out, force, flag="--json", suffixes=(".json",), kind="task-vector report",
                             not_kind=_not_deltas_report)


def write_deltas_json(report: dict, out: str | Path, *, force: bool = False) -> Path:
    out = check_deltas_json(out, force)
    replace_file(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return out


def _not_deltas_report(path: Path) -> Optional[str]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    ok = isinstance(report, dict) and {"parent", "models", "cosines"} <= set(report)
    return None if ok else "an earlier task-vector report"
