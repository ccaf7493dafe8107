"""`medmerge pipeline medcare CONFIG --out OUT`: MedCare against plain LoRA and full fine-tuning.

Every arm starts from the same model (e.g. the general instruct model) and is
evaluated on the same tasks (e.g. knowledge: clinical MCQ; alignment: format-following
clinical generation graded by IFEval's checkers; general instruction following):

- `start`: the model itself;
- `medcare`: stage 1 on knowledge + alignment data, stage 2 on alignment data, exported (folded, verified);
- `medcare_stage1`: the stage-1 knowledge path alone (noise experts dropped, exported);
- `medcare_keep_noise` (ablation): stage 2 keeping the router and noise experts, evaluated unfolded;
- `lora`: the trainer's LoRA on the union of the stage-1 data, for stage 1 + stage 2 steps;
- `full`: full fine-tuning on the same data and steps.

Each step writes into OUT/<arm>/ and is reused on a re-run (an interrupted run
continues), unless --force. Results: results.json, results.md (the table),
training.png (NLL per arm, and stage 2's orthogonality penalty).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field

from ..errors import InputError
from ..evaluation import runner
from ..evaluation.compare import fmt_score
from ..medcare.config import AlignmentSettings, MedCareData, ModuleSettings, load_stage_config
from ..medcare.export import export
from ..medcare.train import data_parts, load_run, run_stage1, run_stage2
from ..runtime import resolve_device
from ..settings import Strict, validated
from ..training.config import LoraSettings, Seed, TrainingSettings
from ..training.trainer import RECORD, train
from .analysis import flat_metrics
from .config import EvalSettings, WorldSettings, experiment_inputs, read_experiment, resolve_eval_paths
from .plots import plot_training
from .rundir import Result, check_run_dir, clear_run_dir, resolved_config, resolved_name, reuse

ARMS = ("start", "medcare", "medcare_stage1", "medcare_keep_noise", "lora", "full")


class Stage(Strict):
    training: TrainingSettings = TrainingSettings()


class Stage2(Stage):
    alignment: AlignmentSettings = AlignmentSettings()


class Baseline(Stage):
    lora: Optional[LoraSettings] = None  # the lora arm's adapter (default: the trainer's r 16 on all projections)
    steps: Optional[int] = None  # default: stage 1 + stage 2 steps


class ExperimentEval(EvalSettings):
    table_metrics: list[str] = []  # TASK/METRIC columns of results.md (default: every metric)


class MedCareExperiment(Strict):
    world: Optional[WorldSettings] = None
    model: Path
    seed: Seed = 0
    chat_template: Optional[str] = None
    max_seq_length: int = Field(512, ge=8)
    knowledge: list[MedCareData] = Field(min_length=1)  # stage 1 only (with the alignment data)
    alignment: list[MedCareData] = Field(min_length=1)  # stage 1 and stage 2
    modules: ModuleSettings = ModuleSettings()
    stage1: Stage = Stage()
    stage2: Stage2 = Stage2()
    lora: Baseline = Baseline(lora=LoraSettings())
    full: Baseline = Baseline()
    arms: list[str] = list(ARMS)
    eval: ExperimentEval


def load(path: str | Path, out: Path, overrides=()) -> tuple[MedCareExperiment, dict]:
    path = Path(path)
    raw, rel, world = read_experiment(path, out, overrides, "medcare experiment config")
    raw["model"] = rel(raw.get("model"))
    for key in ("knowledge", "alignment"):
        items = raw.get(key)
        items = [items] if isinstance(items, dict) else items
        raw[key] = [{**d, "path": rel(d.get("path"))} if isinstance(d, dict) else d for d in items or []]
    raw["eval"] = resolve_eval_paths(raw.get("eval"), rel)
    cfg = validated(MedCareExperiment, raw, path)
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise InputError(f"{path}: arms {unknown} unknown; choose from {', '.join(ARMS)}")
    return cfg, {"world": world, "config_file": str(path.absolute())}


def _stage_raw(cfg: MedCareExperiment, data: list[MedCareData], training: TrainingSettings) -> dict:
    return {"data": [d.model_dump(mode="json") for d in data], "seed": cfg.seed, "chat_template": cfg.chat_template,
            "max_seq_length": cfg.max_seq_length, "training": training.model_dump(mode="json")}


def _trained(folder: Path) -> dict:
    r = json.loads((folder / RECORD).read_text())["result"]
    return {"steps": r["steps"], "train_loss": r["train_loss"], "seconds": r["seconds"],
            "tokens_per_s": r["tokens_per_s"]}


def _train_medcare(cfg: MedCareExperiment, out: Path, progress: bool) -> dict:
    s1, info = out / "medcare" / "stage1", {}
    raw1 = {"model": str(cfg.model), "modules": cfg.modules.model_dump(mode="json"),
            **_stage_raw(cfg, cfg.knowledge + cfg.alignment, cfg.stage1.training)}
    reuse(s1, RECORD, lambda: run_stage1(load_stage_config("stage1", None, raw=raw1), s1, force=True,
                                         progress=progress))
    info["medcare_stage1"] = {"run": str(s1), **_trained(s1)}
    variants = {"medcare": False, "medcare_keep_noise": True}
    for arm, keep in variants.items():
        if arm not in cfg.arms:
            continue
        s2 = out / arm / "stage2"
        alignment = cfg.stage2.alignment.model_copy(update={"keep_noise": keep})
        raw2 = {"stage1": str(s1), "alignment": alignment.model_dump(mode="json", by_alias=True),
                **_stage_raw(cfg, cfg.alignment, cfg.stage2.training)}
        reuse(s2, RECORD, lambda: run_stage2(load_stage_config("stage2", None, raw=raw2), s2, force=True,
                                             progress=progress))
        info[arm] = {"run": str(s2), "stage1": dict(info["medcare_stage1"]), **_trained(s2)}
    for arm, run, drop in (("medcare", "medcare/stage2", False), ("medcare_stage1", "medcare/stage1", True)):
        if arm in cfg.arms:
            folder = out / arm / "model" if arm == "medcare" else out / "medcare_stage1" / "model"
            reuse(folder, "medmerge.yml", lambda: export(out / run, folder, drop_noise=drop, force=True,
                                                         progress=progress))
            info[arm]["model"] = str(folder)
            info[arm]["verified"] = yaml.safe_load((folder / "medmerge.yml").read_text()).get("verified")
    return info


def _train_baseline(cfg: MedCareExperiment, arm: str, out: Path, progress: bool) -> dict:
    b: Baseline = getattr(cfg, arm)
    folder = out / arm / "run"
    steps = b.steps or (cfg.stage1.training.max_steps + cfg.stage2.training.max_steps)
    training = b.training.model_copy(update={"max_steps": steps})
    parts = data_parts(cfg.knowledge + cfg.alignment, cfg.model, seed=cfg.seed, chat_template=cfg.chat_template,
                       max_seq_length=cfg.max_seq_length, packing=True, training=training,
                       lora=(b.lora or LoraSettings()) if arm == "lora" else None)
    reuse(folder, RECORD, lambda: train(parts[0], folder, force=True, progress=progress, data_parts=parts))
    return {"run": str(folder), **_trained(folder)}


def _evaluate(cfg: MedCareExperiment, arm: str, info: dict, out: Path) -> dict:
    folder = out / "eval" / arm
    kw = cfg.eval.kwargs(cfg.seed)
    gen = kw.pop("gen_kwargs")

    def evaluate(model, **extra):
        runner.evaluate(model, cfg.eval.tasks, folder, gen_kwargs=gen, force=True, log_samples=True, **kw, **extra)

    def run_arm():
        if arm == "start":
            evaluate(cfg.model)
        elif arm == "lora":
            evaluate(cfg.model, peft=info["run"])
        elif arm == "full":
            evaluate(info["run"])
        elif arm == "medcare_keep_noise":  # routed experts cannot be folded: evaluate the module model
            from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

            model = load_run(info["run"]).model
            device = resolve_device(kw["device"])
            if device != "cpu":
                model.to(device)
            evaluate(model, tokenizer=AutoTokenizer.from_pretrained(str(cfg.model)))
        else:
            evaluate(info["model"])

    reuse(folder, "results.json", run_arm)
    return flat_metrics(json.loads((folder / "results.json").read_text()))


def run(config: str | Path, out: str | Path, *, overrides=(), force: bool = False, progress: bool = True) -> Result:
    """Train and evaluate every arm into OUT; return results.json's contents, with the table as `.markdown`."""
    inputs = experiment_inputs(config, overrides, "medcare experiment config")  # read before OUT is looked at
    out = check_run_dir(out, force, written=(resolved_name("experiment"),), what="experiment run",
                        inputs=inputs)
    started = time.perf_counter()
    cfg, meta = load(config, out, overrides)
    clear_run_dir(out, force)  # only now: a run refused above deletes nothing
    resolved_config(out, "experiment").write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True),
                                                                 sort_keys=False))

    arms: dict[str, dict] = {"start": {"model": str(cfg.model)}} if "start" in cfg.arms else {}
    if any(a.startswith("medcare") for a in cfg.arms):
        trained = _train_medcare(cfg, out, progress)
        arms.update({a: trained[a] for a in cfg.arms if a in trained})
    for arm in ("lora", "full"):
        if arm in cfg.arms:
            arms[arm] = _train_baseline(cfg, arm, out, progress)
    arms = {a: arms[a] for a in ARMS if a in arms and a in cfg.arms}
    for arm, info in arms.items():
        info["metrics"] = _evaluate(cfg, arm, info, out)
    plot_training(arms, out / "training.png")
    results = {"schema": "medmerge.medcare_experiment/1", "model": str(cfg.model), "world": meta["world"],
               "config_file": meta["config_file"], "arms": arms, "table_metrics": cfg.eval.table_metrics,
               "lambda": cfg.stage2.alignment.lambda_, "wall_time_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    (out / "results.md").write_text(markdown + "\n")
    return Result(results, markdown)


def render(results: dict) -> str:
    arms = results["arms"]
    keys = results.get("table_metrics") or sorted({k for a in arms.values() for k in a["metrics"]})
    head = ["arm", *keys, "train steps", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, info in arms.items():
        runs = ([info["stage1"]] if "stage1" in info else []) + ([info] if "steps" in info else [])
        steps = " + ".join(str(r["steps"]) for r in runs) or "-"
        secs = f"{sum(r['seconds'] for r in runs):.0f}" if runs else "-"
        lines.append("| " + " | ".join([arm, *(fmt_score(info["metrics"].get(k), 3) for k in keys), steps, secs]) + " |")
    out = ["# MedCare vs plain LoRA vs full fine-tuning", "", f"Start model: `{results['model']}`; "
           f"stage-2 lambda {results['lambda']:g}. Scores as the harness reports them (accuracies 0-1).", "", *lines, ""]
    v = (arms.get("medcare") or {}).get("verified")
    if v:
        out.append(f"- MedCare export verified: max |logit diff| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g})")
    out.append(f"- wall time {results['wall_time_s']} s; training curves: training.png")
    return "\n".join(out)
