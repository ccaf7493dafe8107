"""`medmerge pipeline two-stage-lora CONFIG`: PT LoRA, a fresh SFT LoRA, weighted merges, evaluation.

1. (optional) build the miniclinic world (cached) and expose it as `${world}`;
2. stage 1, `pt`: a LoRA adapter trained by continued pre-training on domain text;
3. stage 2, `sft`: a *fresh* LoRA adapter trained on instruction data on top of
   the frozen base (never a resumed stage-1 adapter);
4. for each w_PT in the grid, the exact merge W0 + w_PT dW_PT + (1 - w_PT) dW_SFT
   written by `medmerge adapters merge` (streamed, verified) and evaluated;
5. `results.json`, `results.md` (the table), `loss_curves.png` (both stages),
   reasoning-trace leakage per model, and optionally a decoding-sensitivity grid
   on one merge.

Every step writes into OUT/; a step whose output exists is reused on a re-run
(so an interrupted pipeline continues), unless --force.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field

from ..adapters.merge import merge_adapters
from ..errors import ConfigError
from ..evaluation import runner
from ..settings import Strict, validated
from ..training.config import DataConfig, Finite, LoraSettings, Seed, TrainConfig, TrainingSettings
from ..training.trainer import RECORD, train
from .analysis import DEFAULT_SETTINGS, decoding_grid, decoding_table, flat_metrics, reasoning_leakage
from .config import EvalSettings, WorldSettings, experiment_inputs, read_experiment, resolve_eval_paths
from .plots import loss_curves
from .rundir import Result, check_run_dir, clear_run_dir, resolved_config, resolved_name, reuse


class StageSettings(Strict):
    data: DataConfig
    training: TrainingSettings = TrainingSettings()
    k_shot: Optional[int] = Field(None, ge=1)
    chat_template: Optional[str] = None
    max_seq_length: int = Field(512, ge=8)


class MergeSettings(Finite):
    w_pt: list[float] = [0.0, 0.1, 0.3, 0.5]  # w_SFT = 1 - w_PT
    method: str = "exact"
    density: Optional[float] = None
    keep: bool = True  # keep the merged checkpoints (else deleted after evaluation)


class PipelineEvalSettings(EvalSettings):
    references: bool = True  # also evaluate the base and the PT adapter alone (w_PT = 1)
    table_metrics: list[str] = []  # TASK/METRIC columns of results.md (default: every metric)


class DecodingSettings(Finite):
    w_pt: float  # the merge to analyse
    settings: list[Any] = list(DEFAULT_SETTINGS)


class TwoStageConfig(Strict):
    base: Path
    world: Optional[WorldSettings] = None
    seed: Seed = 0
    lora: LoraSettings = LoraSettings()
    pt: StageSettings
    sft: StageSettings
    merge: MergeSettings = MergeSettings()
    eval: PipelineEvalSettings
    decoding: Optional[DecodingSettings] = None
    reasoning_pattern: str = r"<think>.*?</think>"


def load(path: str | Path, out: Path, overrides: list[str] = ()) -> tuple[TwoStageConfig, dict]:
    """Read CONFIG, build the world if asked (into OUT/world), expand ${world} and $VARS, validate."""
    path = Path(path)
    raw, rel, world_info = read_experiment(path, out, overrides, "pipeline config")

    raw["base"] = rel(raw.get("base"))
    for stage in ("pt", "sft"):
        if isinstance(raw.get(stage), dict) and isinstance(raw[stage].get("data"), dict):
            raw[stage]["data"]["path"] = rel(raw[stage]["data"].get("path"))
    raw["eval"] = resolve_eval_paths(raw.get("eval"), rel)
    cfg = validated(TwoStageConfig, raw, path)
    if not cfg.merge.w_pt:
        raise ConfigError(f"{path}: merge.w_pt is empty")
    return cfg, {"world": world_info, "config_file": str(path.absolute())}


def _train_stage(cfg: TwoStageConfig, kind: str, stage: StageSettings, out: Path, progress: bool) -> dict:
    target = out / f"{kind}_adapter"
    tc = TrainConfig(stage=kind, model=cfg.base, data=stage.data, seed=cfg.seed, k_shot=stage.k_shot, lora=cfg.lora,
                     chat_template=stage.chat_template, max_seq_length=stage.max_seq_length, training=stage.training)
    trained = {}
    if reuse(target, RECORD, lambda: trained.update(res=train(tc, target, force=True, progress=progress))):
        return {"adapter": str(target), "reused": True, **json.loads((target / RECORD).read_text()).get("result", {})}
    res = trained["res"]
    return {"adapter": str(target), "steps": res.steps, "train_loss": res.train_loss,
            "seconds": round(res.seconds, 1), "tokens_per_s": res.tokens_per_second}


def _label(w_pt: float) -> str:
    return f"w_pt={w_pt:g}"


def run(config: str | Path, out: str | Path, *, overrides: list[str] = (), force: bool = False,
        progress: bool = True) -> Result:
    """Run the recipe into OUT; return the results (also OUT/results.json) with the table as `.markdown`."""
    inputs = experiment_inputs(config, overrides, "pipeline config")  # the config is read before OUT is looked at
    out = check_run_dir(out, force, written=(resolved_name("pipeline"),), what="pipeline run",
                        inputs=inputs)
    started = time.perf_counter()
    cfg, info = load(config, out, overrides)
    clear_run_dir(out, force)  # only now: a run refused above deletes nothing
    resolved_config(out, "pipeline").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    stages = {"pt": _train_stage(cfg, "pt", cfg.pt, out, progress),
              "sft": _train_stage(cfg, "sft", cfg.sft, out, progress)}
    pt, sft = Path(stages["pt"]["adapter"]), Path(stages["sft"]["adapter"])
    loss_curves({"stage 1: PT (DAPT) LoRA": pt, "stage 2: SFT LoRA (fresh adapter)": sft}, out / "loss_curves.png",
                title="two-stage LoRA: training loss")

    ev = cfg.eval
    eval_kwargs = ev.kwargs(cfg.seed)
    gen = eval_kwargs.pop("gen_kwargs")

    models: list[dict] = []
    if ev.references:
        models.append({"label": "base", "w_pt": None, "w_sft": None, "path": str(cfg.base)})
    grid = list(cfg.merge.w_pt)
    if ev.references and 1.0 not in grid:
        grid.append(1.0)
    for w in grid:
        label = _label(w)
        folder = out / "merges" / label
        reuse(folder, "medmerge.yml", lambda: merge_adapters(
            cfg.base, [(pt, w), (sft, 1.0 - w)], folder, method=cfg.merge.method, density=cfg.merge.density,
            seed=cfg.seed, force=True, progress=progress))
        verified = yaml.safe_load((folder / "medmerge.yml").read_text()).get("verified", {})
        models.append({"label": label, "w_pt": w, "w_sft": 1.0 - w, "path": str(folder), "verified": verified})

    for m in models:
        folder = out / "eval" / m["label"]
        reuse(folder, "results.json", lambda: runner.evaluate(m["path"], ev.tasks, folder, gen_kwargs=gen,
                                                              log_samples=True, force=True, **eval_kwargs))
        res = json.loads((folder / "results.json").read_text())
        m["metrics"] = flat_metrics(res)
        m["eval"] = str(folder)
    leakage = reasoning_leakage({m["label"]: m["eval"] for m in models}, cfg.reasoning_pattern)
    for m in models:
        m["reasoning_leakage"] = leakage[m["label"]]
        if not cfg.merge.keep and m["w_pt"] is not None:
            shutil.rmtree(m["path"], ignore_errors=True)

    decoding = None
    if cfg.decoding is not None:
        target = out / "merges" / _label(cfg.decoding.w_pt)
        if not target.is_dir():
            raise ConfigError(f"decoding.w_pt {cfg.decoding.w_pt} is not in merge.w_pt {cfg.merge.w_pt} (or "
                              "merge.keep is false)")
        decoding = decoding_grid(target, cfg.decoding.settings, ev.tasks, out / "decoding",
                                 max_new_tokens=ev.max_new_tokens, reasoning_pattern=cfg.reasoning_pattern,
                                 force=True, **eval_kwargs)

    results = {
        "schema": "medmerge.two_stage_lora/1", "base": str(cfg.base), "world": info["world"],
        "config_file": info["config_file"], "stages": stages, "method": cfg.merge.method, "models": models,
        "reasoning_pattern": cfg.reasoning_pattern, "decoding": decoding, "table_metrics": ev.table_metrics,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    (out / "results.md").write_text(markdown + "\n")
    return Result(results, markdown)


def render(results: dict) -> str:
    """The table: one row per model, one column per task metric, plus leakage and verification."""
    keys = results.get("table_metrics") or sorted({k for m in results["models"] for k in m["metrics"]})
    head = ["model", "w_PT", "w_SFT", *keys, "reasoning leakage", "verified"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results["models"]:
        w = ("-", "-") if m["w_pt"] is None else (f"{m['w_pt']:g}", f"{m['w_sft']:g}")
        v = m.get("verified") or {}
        ver = "-" if not v else ("yes" if v.get("ok") else "NO") + f" (max abs {v.get('max_abs_error', 0):.2g})"
        lines.append("| " + " | ".join([m["label"], *w, *(f"{m['metrics'].get(k, float('nan')):.3f}" for k in keys),
                                         f"{m['reasoning_leakage']['rate']:.3f}", ver]) + " |")
    out = ["# Two-stage LoRA: weighted merges of a PT and an SFT adapter", "",
           f"Base: `{results['base']}`; merge: W0 + w_PT dW_PT + w_SFT dW_SFT ({results['method']}).", "",
           *lines, ""]
    for name, st in results["stages"].items():
        loss = st.get("train_loss", float("nan"))
        out.append(f"- stage {name}: {st.get('steps', '?')} steps, mean train loss {loss:.3f}, {st.get('seconds', '?')} s")
    out.append(f"- wall time {results['wall_time_s']} s; loss curves: loss_curves.png")
    if results.get("decoding"):
        out += ["", f"## Decoding sensitivity ({results['decoding']['model']})", "",
                decoding_table(results["decoding"], keys or None)]
    return "\n".join(out)
