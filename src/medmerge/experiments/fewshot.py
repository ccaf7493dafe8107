"""`medmerge fewshot CONFIG --out DIR`: is a merged model a better starting point for few-shot fine-tuning?

The weight-space merging paper's claim: a merged model fine-tuned on 64 examples of a
clinical task matches the instruct model fine-tuned on 256. This command fine-tunes
each starting point (the instruct model, a chosen merge, ...) on k examples for every
k (nested, seeded subsets: the 16 are part of the 64), with the same training
settings and seed for every run, evaluates every run on the clinical and
instruction-following tasks, plots score against k, and states the claim next
to what was measured.

    world: {preset: full}                        # optional (${world})
    starts:
      instruct: ${world}/models/instruct         # a folder ...
      merged: {sweep: runs/sweep}                # ... a sweep's best point (exported here)
      # merged: {merge: {merge_method: slerp, ...}}   # ... or a merge config with model folders
    data: {path: ${world}/data/tasks/gen_train.jsonl, prompt_template: "...", response: impression}
    k: [16, 64, 256]
    training: {max_steps: 100, batch_size: 16, lr: 2e-3}    # the same for every run
    eval: {tasks: [...], ...}
    scores: {if_metric: ..., clinical_metrics: [...]}
    claim: {model: merged, k: 64, versus: instruct, versus_k: 256, tolerance: 1.0}

Every step writes under OUT and is reused on a re-run (an interrupted run continues).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, model_validator

from ..errors import InputError
from ..evaluation import runner
from ..evaluation.bootstrap import Bootstrap, difference_interval, tasks_of, verdict
from ..evaluation.compare import fmt_score as _f
from ..evaluation.scores import summary_scores
from ..io.paths import safe_name, under
from ..merging import merge
from ..runtime import library_versions
from ..settings import Strict, validated
from ..training.config import DataConfig, Finite, LoraSettings, Seed, TrainConfig, TrainingSettings
from ..training.trainer import RECORD, train
from .config import EvalSettings, WorldSettings, experiment_inputs, read_experiment, resolve_eval_paths
from .plots import loss_curves, plot_fewshot
from .rundir import Result, check_run_dir, clear_run_dir, resolved_config, resolved_name, reuse
from .sweep.points import with_paths

SCHEMA = "medmerge.fewshot/1"


class Scores(Strict):
    if_metric: str = "mm_ifeval/mean"
    clinical_metrics: list[str]


class Claim(Finite):
    model: str = "merged"
    k: int = 64
    versus: str = "instruct"
    versus_k: int = 256
    tolerance: float = Field(1.0, ge=0)  # points on the 0-100 scale within which "matches" holds
    replicates: int = Field(2000, ge=100, le=100_000)  # paired bootstrap over the evaluation documents
    confidence: float = Field(0.95, gt=0.5, lt=1)


class FewshotConfig(Strict):
    world: Optional[WorldSettings] = None
    starts: dict[str, Union[Path, dict[str, Any]]]
    data: DataConfig
    k: list[int] = [16, 64, 256]
    seed: Seed = 0
    training: TrainingSettings = TrainingSettings(max_steps=100, batch_size=16, lr=2e-3)
    lora: Optional[LoraSettings] = None
    chat_template: Optional[str] = None
    max_seq_length: int = Field(256, ge=8)
    truncation: Literal["end", "prompt"] = "end"  # as `medmerge train`'s (prompt: keep whole answers)
    eval: EvalSettings
    scores: Scores
    claim: Optional[Claim] = Claim()

    @model_validator(mode="after")
    def _consistent(self):
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError("k must list positive example counts, e.g. [16, 64, 256]")
        for name, start in self.starts.items():
            safe_name(name, "starts: the name")  # it names folders under OUT (starts/, runs/, eval/)
            if isinstance(start, dict) and not ({"sweep"} <= set(start) or {"merge"} <= set(start)):
                raise ValueError(f"starts.{name}: a folder, {{sweep: RUN_DIR}} or {{merge: CONFIG}}")
        if self.claim is not None:
            for name, k in ((self.claim.model, self.claim.k), (self.claim.versus, self.claim.versus_k)):
                if name not in self.starts:
                    raise ValueError(f"claim: {name!r} is not one of starts ({', '.join(self.starts)})")
                if k not in self.k:
                    raise ValueError(f"claim: k={k} is not in k {self.k}")
        return self


def load(path: str | Path, out: Path, overrides: list[str] = (), progress: bool = True) -> tuple[FewshotConfig, dict]:
    path = Path(path)
    raw, rel, world = read_experiment(path, out, overrides, "few-shot config", progress)
    for name, start in (raw.get("starts") or {}).items():
        if isinstance(start, str):
            raw["starts"][name] = rel(start)
        elif isinstance(start, dict) and "sweep" in start:
            start["sweep"] = rel(start["sweep"])
    if isinstance(raw.get("data"), dict):
        raw["data"]["path"] = rel(raw["data"].get("path"))
    raw["eval"] = resolve_eval_paths(raw.get("eval"), rel)
    cfg = validated(FewshotConfig, raw, path)
    return cfg, {"world": world, "config_file": str(path.absolute())}


def resolve_start(name: str, start, out: Path, progress: bool) -> tuple[Path, dict]:
    """A starting point's model folder (exporting a merge when the start is one) and its description."""
    if not isinstance(start, dict):
        path = Path(start)
        if not (path / "config.json").is_file():
            raise InputError(f"starts.{name}: {path} is not a model folder (no config.json)")
        return path, {"kind": "folder", "path": str(path)}
    target = under(out, "starts", name, what=f"starts.{name}")
    if "sweep" in start:
        summary_file = Path(start["sweep"]) / "sweep_summary.json"
        if not summary_file.is_file():
            raise InputError(f"starts.{name}: {summary_file} does not exist; run `medmerge sweep` first")
        summary = json.loads(summary_file.read_text())
        best = summary.get("best")
        if not best:
            raise InputError(f"starts.{name}: the sweep in {start['sweep']} has no best point (see its sweep.md)")
        config = with_paths(best["config"], {k: Path(v) for k, v in summary["models"].items()})
        info = {"kind": "sweep best", "sweep": str(start["sweep"]), "label": best["label"], "config": config}
    else:
        config = start["merge"]
        info = {"kind": "merge", "config": config}
    reuse(target, "medmerge.yml", lambda: merge(config, target, force=True, progress=progress))
    info["path"] = str(target)
    return target, info


def _train(cfg: FewshotConfig, start: Path, k: int, target: Path, progress: bool) -> dict:
    tc = TrainConfig(stage="sft", model=start, data=cfg.data, seed=cfg.seed, k_shot=k, lora=cfg.lora,
                     chat_template=cfg.chat_template, max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                     training=cfg.training)
    reuse(target, RECORD, lambda: train(tc, target, force=True, progress=progress))
    rec = json.loads((target / RECORD).read_text())
    return {"path": str(target), **rec.get("result", {}), "k_shot": rec.get("k_shot")}


def _model_for_eval(target: Path, start: Path, lora: bool) -> tuple[Path, Optional[Path]]:
    return (start, target) if lora else (target, None)


def run(config: str | Path, out: str | Path, *, overrides: list[str] = (), force: bool = False,
        progress: bool = True) -> Result:
    """Run every start and k into OUT; return fewshot.json's contents, with fewshot.md as `.markdown`."""
    results, stale = ("fewshot.json", "fewshot.md"), ("starts", "runs", "eval")
    inputs = experiment_inputs(config, overrides, "few-shot config")  # the config is read before OUT is looked at
    out = check_run_dir(out, force, results, stale=stale, written=(resolved_name("fewshot"),),
                        what="few-shot run", inputs=inputs)
    started = time.perf_counter()
    cfg, info = load(config, out, overrides, progress=progress)
    clear_run_dir(out, force, results, stale=stale)  # only now: a run refused above deletes nothing
    resolved_config(out, "fewshot").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    eval_kwargs = cfg.eval.kwargs(cfg.seed)
    gen = eval_kwargs.pop("gen_kwargs")

    def scores(model: Path, peft: Optional[Path], label: str) -> dict:
        folder = out / "eval" / label
        reuse(folder, "results.json", lambda: runner.evaluate(model, cfg.eval.tasks, folder, peft=peft, gen_kwargs=gen,
                                                              force=True, quiet=True, log_samples=True, **eval_kwargs))
        res = json.loads((folder / "results.json").read_text())
        per_doc[label] = res.get("per_doc", {})
        return {"tasks": res["tasks"], **summary_scores(res, cfg.scores.if_metric, cfg.scores.clinical_metrics),
                "eval": str(folder)}

    per_doc: dict[str, dict] = {}

    starts, runs = {}, []
    for name, spec in cfg.starts.items():
        path, desc = resolve_start(name, spec, out, progress)
        starts[name] = {**desc, **scores(path, None, f"{name}-k0")}
        for k in sorted(cfg.k):
            label = f"{name}-k{k}"
            t0 = time.perf_counter()
            trained = _train(cfg, path, k, out / "runs" / label, progress)
            model, peft = _model_for_eval(out / "runs" / label, path, cfg.lora is not None)
            runs.append({"start": name, "k": k, "label": label, "train": trained, **scores(model, peft, label),
                         "seconds": round(time.perf_counter() - t0, 1)})
    loss_curves({r["label"]: r["train"]["path"] for r in runs}, out / "loss_curves.png",
                title="few-shot fine-tuning: training loss")
    result = {
        "schema": SCHEMA, "config_file": info["config_file"], "world": info["world"], "k": sorted(cfg.k),
        "seed": cfg.seed, "training": cfg.training.model_dump(), "lora": cfg.lora.model_dump() if cfg.lora else None,
        "data": str(cfg.data.path), "if_metric": cfg.scores.if_metric, "clinical_metrics": cfg.scores.clinical_metrics,
        "starts": starts, "runs": runs, "claim": check_claim(cfg, runs, per_doc) if cfg.claim else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    result["versions"] = library_versions(*runner.RECORDED_LIBRARIES)
    (out / "fewshot.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot_fewshot(result, out / "fewshot.png")
    markdown = render_markdown(result)
    (out / "fewshot.md").write_text(markdown + "\n")
    return Result(result, markdown)


def check_claim(cfg: FewshotConfig, runs: list[dict], per_doc: Optional[dict] = None) -> dict:
    """The claim (model@k matches versus@versus_k within the tolerance) against the measured scores, with paired
    bootstrap intervals of the differences over the evaluation documents (`per_doc`: run label -> per-doc scores).

    On the clinical composite: "holds" when the interval's low end is at least -tolerance, "does not hold" when
    its high end is below -tolerance, otherwise "cannot tell at this sample size"."""
    c = cfg.claim
    by = {(r["start"], r["k"]): r for r in runs}
    a, b = by[(c.model, c.k)], by[(c.versus, c.versus_k)]
    if_metric, parts = cfg.scores.if_metric, cfg.scores.clinical_metrics
    per_doc = per_doc or {}
    boot = Bootstrap({"model": per_doc.get(a["label"], {}), "versus": per_doc.get(b["label"], {})},
                     tasks_of([if_metric, *parts]), replicates=c.replicates, seed=cfg.seed, confidence=c.confidence)
    verdicts = {}
    for key in ("clinical_score", "if_score"):
        x, y = a[key], b[key]
        if x is None or y is None:
            verdicts[key] = {"model": x, "versus": y, "difference": None, "interval": None, "holds": None,
                             "verdict": "undefined (a score is missing)"}
            continue
        diff = difference_interval(boot, "model", "versus", key, if_metric, parts)
        word = verdict(diff, c.tolerance)
        verdicts[key] = {"model": x, "versus": y, "difference": x - y,
                         "interval": diff.as_dict() if diff is not None else None,
                         "holds": True if word == "holds" else False if word == "does not hold" else None,
                         "verdict": word}
    v = verdicts["clinical_score"]
    text = (f"Claim: {c.model} fine-tuned on {c.k} examples matches {c.versus} fine-tuned on {c.versus_k} "
            f"(within {c.tolerance:g} points on the clinical composite).")
    iv = v.get("interval")
    diff_text = (f"difference {v['difference']:+.1f} points, {100 * c.confidence:g}% paired bootstrap interval "
                 f"[{iv['low']:+.1f}, {iv['high']:+.1f}] over {_docs(per_doc.get(a['label'], {}), parts)} documents"
                 if iv and iv.get("low") is not None else
                 f"difference {v['difference']:+.1f} points (no per-document scores: no interval)"
                 if v["difference"] is not None else "")
    measured = (f"Measured: clinical {_f(v['model'])} vs {_f(v['versus'])}, instruction following "
                f"{_f(verdicts['if_score']['model'])} vs {_f(verdicts['if_score']['versus'])}"
                + (f"; {diff_text}" if diff_text else "") + f": {v['verdict']}.")
    return {**c.model_dump(), "scores": verdicts, "holds": v["holds"], "verdict": v["verdict"], "statement": text,
            "measured": measured}


def _docs(per_doc: dict, parts: list[str]) -> str:
    counts = [len(per_doc[t]["doc_ids"]) for t in tasks_of(parts) if t in per_doc]
    return "+".join(str(n) for n in counts) if counts else "0"


def render_markdown(result: dict) -> str:
    lines = ["# Few-shot efficiency", "",
             f"IF = {result['if_metric']}; clinical = mean of {', '.join(result['clinical_metrics'])} (0-100). "
             f"Every run: the same training settings and seed {result['seed']}; nested k-example subsets.", "",
             "| start | k | IF | clinical | train loss | steps |", "|---|---|---|---|---|---|"]
    for name, s in result["starts"].items():
        lines.append(f"| {name} | 0 | {_f(s['if_score'])} | {_f(s['clinical_score'])} | - | - |")
        for r in (r for r in result["runs"] if r["start"] == name):
            lines.append(f"| {name} | {r['k']} | {_f(r['if_score'])} | {_f(r['clinical_score'])} | "
                         f"{_f(r['train'].get('train_loss'), 3)} | {r['train'].get('steps', '-')} |")
    if result.get("claim"):
        lines += ["", result["claim"]["statement"], result["claim"]["measured"]]
    lines += ["", f"Wall time {result['wall_time_s']} s."]
    return "\n".join(lines)


