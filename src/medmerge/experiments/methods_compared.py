"""`medmerge compare-methods CONFIG OUT`: every merge method on the same two axes, with the same budget each.

The comparison this project exists for: how much instruction following (IF) each merge method retains
against how much of the clinical gain it keeps, when no method is tuned more than another and no method
is judged on the documents it was tuned on.

    world: {preset: quick}                   # optional: the synthetic world (${world}), as `medmerge sweep`
    models: {base: ..., clinical: ..., instruct: ...}
    roles: {domain: clinical, general: instruct, base: base}
    eval: {tasks: [...], batch_size: 16, max_new_tokens: 64}      # no limit/subset: split: picks the documents
    scores: {if_metric: TASK/METRIC, clinical_metrics: [TASK/METRIC, ...]}
    select: {if_retention_min: 95, maximize: clinical}            # how each method's setting is chosen on dev
    split: {dev: 12, held_out: 36, seed: 0}  # per task: a seeded permutation; its first `dev` documents tune,
                                             # the next `held_out` (default: all the rest) judge
    methods:                                 # method -> its settings; one dict is one setting (no expansion)
      linear: [{t: 0.3}, {t: 0.6}]
      ties: [{t: 0.5, density: 0.5}, {t: 0.5, density: 0.8}]
      karcher: [{max_iter: 10}, {max_iter: 20}]                  # methods without a share take no t
      regmean: [{t: 0.5, models: {clinical: {stats: a.pt}, instruct: {stats: b.pt}}}, ...]  # per-model values
    left_out: {model_stock: "needs a base distinct from both models"}   # optional: why a method is not run
    budget: equal                            # every method gets as many settings (default); unequal_ok: allowed
    replicates: 1000                         # bootstrap replicates (intervals and differences)

A setting is built like a sweep point (`sweep.points.build_config`) where the method weighs the two
models (a per-model `weight`, or slerp's `t`): `t` is the domain model's share. Methods that do not
weigh them (karcher, sce, ram, ...) get both models as inputs (and the base where they need one); the
two-model methods that treat one input as the base (nearswap, arcee_fusion) get the general model as
the base, as slerp does. A setting's `models: {ROLE: {PARAM: VALUE}}` adds per-model values to that
role's entry (a string value of a free-form parameter, a statistics file, is resolved against the
config's folder).

The budget is the number of settings; with `budget: equal` every method must have as many, except a
method with no parameter at all, whose whole space is its one setting. Registry methods the config
does not run are listed in the outputs with the reason (`left_out:`, or a built-in one).

The recipe: check the whole plan (names, budgets, every setting's merge config, the split against the
documents) before anything is scored -> step 1, dev: score every setting and both references on the
dev documents (the sweep's evaluator: merges in memory, every result cached under OUT/cache, so a
re-run resumes) and choose each method's setting by `select:` (`sweep.select.best_under_constraint`;
when no setting meets the IF floor, the sweep's objective, `Scorer.objective`, and the output says so)
-> step 2, held-out: score the references and each chosen setting on the held-out documents; IF
retained and clinical gain kept with paired bootstrap intervals (`sweep.scoring.add_relative`); each
method's paired difference from the best method on each axis, "within noise" when its interval holds 0.

Outputs in OUT: `methods_compared.json`, `methods_compared.md` (the table and a paragraph written from
the numbers), `methods_compared.png`, `methods_compared.resolved.yml`, `cache/`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import yaml
from pydantic import Field, model_validator

from ..errors import ConfigError, InputError
from ..evaluation.bootstrap import Bootstrap, tasks_of
from ..evaluation.compare import fmt_score as _f
from ..evaluation.compare import fmt_with_ci
from ..evaluation.runner import RECORDED_LIBRARIES
from ..evaluation.scores import relative_scores, summary_scores
from ..io.fingerprint import fingerprint, sha256_file
from ..io.stats import STATS_RECORD
from ..merging import methods as registry
from ..merging.config import parse_config
from ..merging.methods.base import GLOBAL, check_counts
from ..merging.plan import input_refs
from ..runtime import library_versions, pyplot, track
from ..settings import Strict, apply_overrides, read_yaml, validated
from ..training.config import Seed
from ..training.stats import collect_stats, data_spec
from .analysis import replace_file
from .config import WorldSettings, experiment_inputs, read_experiment, resolve_eval_paths
from .rundir import Result, check_run_dir, clear_run_dir, resolved_config, resolved_name
from .sweep.config import RoleNames, Scores, Select, SweepEval, check_models_and_tasks
from .sweep.evaluator import Selection, SweepEvaluator
from .sweep.points import Point, Roles, build_config, check_point, short
from .sweep.run import open_evaluator
from .sweep.scoring import SWEEP_REPLICATES, Scorer, add_relative, reference_point
from .sweep.select import best_under_constraint

SCHEMA = "medmerge.methods_compared/1"
NAME = "methods_compared"
WHAT = "methods comparison config"
OUTPUTS = (f"{NAME}.json", f"{NAME}.md", f"{NAME}.png")
AXES = {"if_retention_pct": "IF retained", "clinical_gain_kept_pct": "clinical gain kept"}
# registry methods that cannot be one point between two models, whatever the config says
CALIBRATED = "_statistics"  # a setting's key for the statistics folders the comparison computes (not in labels)
NOT_AN_INTERPOLATION = {
    "passthrough": "stacks or copies the layers of one model; not an interpolation of two models",
}


class Split(Strict):
    dev: int = Field(..., ge=1)  # documents per task that choose each method's setting
    held_out: Optional[int] = Field(None, ge=1)  # documents per task that judge (default: every other one)
    seed: Optional[Seed] = None  # the permutation's seed (default: the config's seed)


class Calibration(Strict):
    """The calibration mix of the data-aware methods (regmean, fisher): `medmerge stats` runs on each model."""

    data: list[str] = Field(..., min_length=1)  # FILE or FILE:N (a seeded sample of N records), relative to the config
    max_length: int = Field(256, ge=2)  # tokens per example
    seed: Optional[Seed] = None  # of the FILE:N samples (default: the config's seed)


class MethodsConfig(Strict):
    world: Optional[WorldSettings] = None
    models: dict[str, Path]
    roles: RoleNames = RoleNames()
    references: list[str] = ["instruct", "clinical"]
    load: Optional[str] = None  # the model whose architecture/tokenizer is loaded (default: roles.general)
    eval: SweepEval
    scores: Scores = Scores()
    select: Select = Select()
    split: Split
    methods: dict[str, list[dict[str, Any]]]
    left_out: dict[str, str] = {}  # method -> why this comparison does not run it
    calibration: Optional[Calibration] = None  # statistics for regmean/fisher settings that name none
    budget: Literal["equal", "unequal_ok"] = "equal"
    replicates: int = Field(SWEEP_REPLICATES, ge=1)
    seed: Seed = 0
    dtype: Optional[str] = None
    device: str = "auto"

    @model_validator(mode="after")
    def _consistent(self):
        check_models_and_tasks(self, "method")
        for name in (self.roles.domain, self.roles.general):
            if name not in self.references:
                raise ValueError(f"references: add {name!r}: retention and gain kept are measured against it")
        for key in ("limit", "subset"):
            if getattr(self.eval, key) is not None:
                raise ValueError(f"eval.{key}: the documents come from split: (dev, held_out); drop eval.{key}")
        if not self.methods:
            raise ValueError("methods is empty: give each merge method to compare its settings")
        return self


# --- the plan: every check before anything is scored ------------------------------------------------------------


def check_method_names(methods: Any, left_out: Any, where: str | Path) -> None:
    """Every method named under `methods:` and `left_out:` is in the registry, and none is in both."""
    if not isinstance(methods, dict):
        raise ConfigError(f"{where}: methods: must map each merge method to a list of settings, e.g. "
                          "methods: {linear: [{t: 0.3}, {t: 0.6}]}")
    left_out = left_out if isinstance(left_out, dict) else {}
    for section, names in (("methods", methods), ("left_out", left_out)):
        for name in names:
            if name not in registry.REGISTRY:
                raise ConfigError(f"{where}: {section}: unknown merge method {name!r}; available: "
                                  f"{', '.join(sorted(registry.REGISTRY))}")
    both = sorted(set(methods) & set(left_out))
    if both:
        raise ConfigError(f"{where}: {both[0]} is under both methods: and left_out:; keep it in one")


def _weighs_models(method: str) -> bool:
    """Whether the method weighs the two models (the sweep's share t applies): a per-model weight, or slerp."""
    spec = registry.get(method).spec
    return method in ("slerp", "model_stock") or any(p.name == "weight" and p.scope != GLOBAL for p in spec.params)


def _one_setting_only(method: str) -> bool:
    """A method without any parameter: its one setting is its whole space (exempt from the budget)."""
    return not registry.get(method).spec.params and not _weighs_models(method)


def _unweighted_config(method: str, params: dict[str, Any], roles: Roles) -> dict:
    """The merge config of a method that does not weigh the models: both as inputs, the parameters where the
    method declares them. A two-input method with a base (nearswap, arcee_fusion) takes the general model as
    its base, as slerp does; any other gets the shared ancestor where it needs a base."""
    spec = registry.get(method).spec
    declared = {p.name: p for p in spec.params}
    top, per_model = {}, {}
    for name, value in params.items():
        if name not in declared:
            takes = ", ".join(sorted(declared)) or "nothing"
            hint = " (it does not weigh the two models, so there is no share t)" if name == "t" else ""
            raise ConfigError(f"method {method} has no parameter {name!r}{hint}; it takes {takes}")
        (top if declared[name].scope == GLOBAL else per_model)[name] = value
    if spec.base == "required" and spec.max_inputs == 2:
        cfg = {"merge_method": method, "base_model": roles.general, "models": [{"model": roles.domain}]}
    else:
        cfg = {"merge_method": method, "models": [{"model": roles.domain}, {"model": roles.general}]}
        if spec.base == "required":
            cfg["base_model"] = roles.base
    if per_model:
        for m in cfg["models"]:
            m["parameters"] = dict(per_model)
    if top:
        cfg["parameters"] = top
    return cfg


def setting_label(method: str, setting: dict) -> str:
    """"ties t=0.5 density=0.8", per-model values as ROLE.PARAM (a file by its name)."""
    parts = [f"{k}={short(v)}" for k, v in setting.items() if k not in ("models", CALIBRATED)]
    for role, params in (setting.get("models") or {}).items():
        parts += [f"{role}.{k}={Path(v).name if isinstance(v, str) else short(v)}" for k, v in params.items()]
    return " ".join([method, *parts])


def setting_point(method: str, setting: dict, roles: Roles) -> Point:
    """One setting as a sweep point with its merge config built here (per-model values included)."""
    params = dict(setting)
    per_role = params.pop("models", None) or {}
    if not isinstance(per_role, dict) or not all(isinstance(v, dict) for v in per_role.values()):
        raise ConfigError(f"method {method}: models: must map a role to its parameters, e.g. "
                          "models: {clinical: {stats: clinical.stats}}")
    per_role = {role: dict(values) for role, values in per_role.items()}
    for role, folder in (params.pop(CALIBRATED, None) or {}).items():  # statistics computed by the comparison
        per_role.setdefault(role, {})["stats"] = folder
    build = build_config if _weighs_models(method) else _unweighted_config
    config = build(method, params, roles)
    entries = {m["model"]: m for m in config["models"]}
    for role, values in per_role.items():
        if role not in entries:
            raise ConfigError(f"method {method}: models.{role}: this merge's inputs are {', '.join(entries)}; "
                              "per-model values go to one of them")
        entries[role]["parameters"] = {**entries[role].get("parameters", {}), **values}
    return Point(method=method, params=setting, config=config, label=setting_label(method, setting))


def plan_methods(cfg: MethodsConfig, where: str | Path = WHAT) -> tuple[dict[str, list[Point]], list[dict]]:
    """Every check that needs no model -> (method -> its points, in the config's order; the registry methods left
    out, each with its reason). Unknown or inapplicable methods, unequal budgets, repeated settings, and any
    setting whose merge config the engine would refuse are ConfigErrors naming the method and the setting."""
    check_method_names(cfg.methods, cfg.left_out, where)
    roles = Roles(**cfg.roles.model_dump())
    for method in cfg.methods:
        if method in NOT_AN_INTERPOLATION:
            raise ConfigError(f"{where}: methods.{method}: {NOT_AN_INTERPOLATION[method]}; remove it from methods:")
        if not cfg.methods[method]:
            raise ConfigError(f"{where}: methods.{method} has no settings; give it the budget's number of settings")
    check_budget(cfg, where)
    points: dict[str, list[Point]] = {}
    for method, settings in cfg.methods.items():
        seen = set()
        for i, setting in enumerate(settings):
            key = json.dumps(setting, sort_keys=True, default=str)
            if key in seen:
                raise ConfigError(f"{where}: methods.{method}[{i}] repeats an earlier setting; a budget counts "
                                  "distinct settings")
            seen.add(key)
            try:
                point = setting_point(method, setting, roles)
                config = check_point(point, roles, list(cfg.models), cfg.seed, cfg.dtype)
            except ConfigError as e:
                raise ConfigError(f"{where}: methods.{method}[{i}]: {str(e).removeprefix('sweep: ')}") from None
            refs, base = input_refs(parse_config(config, source="merge config"))
            spec = registry.get(method).spec
            problem = check_counts(spec, len(refs), base is not None and spec.base != "ignored")
            if problem:
                raise ConfigError(f"{where}: methods.{method}: {problem} with these roles (domain {roles.domain}, "
                                  f"general {roles.general}, base {roles.base}); list it under left_out: with the "
                                  "reason instead")
            points.setdefault(method, []).append(point)
    return points, left_out_methods(cfg)


def check_budget(cfg: MethodsConfig, where: str | Path = WHAT) -> int:
    """The budget (settings per method): with `budget: equal`, every method must have that many (a method with no
    parameter: its one setting). Returns it."""
    counts = {m: len(s) for m, s in cfg.methods.items()}
    budget = max([n for m, n in counts.items() if not _one_setting_only(m)] or [1])
    if cfg.budget == "equal":
        bad = {m: n for m, n in counts.items() if n != (1 if _one_setting_only(m) else budget)}
        if bad:
            listed = ", ".join(f"{m} has {n}" for m, n in counts.items())
            raise ConfigError(f"{where}: methods: unequal budgets ({listed}): every method gets the same number of "
                              f"settings ({budget} here; one for a method without parameters) so that none wins by "
                              f"being tuned more; give {', '.join(bad)} {budget}, or set `budget: unequal_ok` to "
                              "compare anyway (the outputs then say so)")
    return budget


def left_out_methods(cfg: MethodsConfig) -> list[dict]:
    """Every registry method the config does not run, with the reason: the config's, or a built-in one."""
    out = []
    for method in sorted(registry.REGISTRY):
        if method in cfg.methods:
            continue
        reason = cfg.left_out.get(method) or NOT_AN_INTERPOLATION.get(method)
        if reason is None and getattr(registry.get(method).spec, "stats", None):
            reason = ("needs each model's calibration statistics (`medmerge stats`); not in this config's methods: "
                      "(add it with models: {ROLE: {stats: FOLDER}} in each setting)")
        reason = reason or "not in this config's methods: (add it there with the budget's number of settings)"
        out.append({"method": method, "reason": reason})
    return out


# --- the split ---------------------------------------------------------------------------------------------------


def split_documents(counts: dict[str, int], dev: int, held_out: Optional[int], seed: int) -> tuple[dict, dict]:
    """{task: document count} -> (dev indices, held-out indices) per task: a seeded permutation of each task's
    documents, its first `dev` the dev split and the next `held_out` (default: the rest) the held-out one.
    Disjoint by construction; a task with too few documents is a ConfigError naming it."""
    dev_ids, held_ids = {}, {}
    for task, n in counts.items():
        need = dev + (held_out or 1)
        if n < need:
            wanted = f"dev {dev} + held_out {held_out}" if held_out else f"more than split.dev ({dev})"
            raise ConfigError(f"split: task {task} has {n} documents, which cannot hold {wanted}; lower split.dev"
                              f"{' or split.held_out' if held_out else ''}, or leave {task} out of eval.tasks")
        order = random.Random(f"methods_compared:{seed}:{task}").sample(range(n), n)
        dev_ids[task] = sorted(order[:dev])
        held_ids[task] = sorted(order[dev:dev + held_out] if held_out else order[dev:])
    return dev_ids, held_ids


def split_selections(ev: SweepEvaluator, split: Split, seed: int) -> tuple[Selection, Selection, dict]:
    counts = {leaf: n for task in ev.tasks for leaf, n in ev.leaf_counts(task).items()}
    dev_ids, held_ids = split_documents(counts, split.dev, split.held_out, seed)
    dev = Selection(samples=dev_ids, label=f"dev: {split.dev} documents per task")
    held = Selection(samples=held_ids, label="held-out: " + (f"{split.held_out} documents per task" if split.held_out
                                                             else "every document not in dev"))
    documents = {t: {"total": n, "dev": len(dev_ids[t]), "held_out": len(held_ids[t])} for t, n in counts.items()}
    info = {"seed": seed, "dev": split.dev, "held_out": split.held_out, "documents": documents,
            "dev_ids": dev_ids, "held_out_ids": held_ids}
    return dev, held, info


# --- step 1: each method's setting, chosen on dev ----------------------------------------------------------------


def choose_setting(rows: Sequence[dict], select: Select, if_reference: Optional[float],
                   objective: Callable[[dict], Optional[float]]) -> dict:
    """The dev row chosen by the selection rule, or by `objective` when no row meets the IF floor:
    {index, by: rule|objective, feasible, threshold, why}."""
    maximize = "clinical_score" if select.maximize == "clinical" else "if_score"
    goal = "clinical score" if select.maximize == "clinical" else "IF score"
    pick = best_under_constraint(rows, if_reference=if_reference, if_retention_min=select.if_retention_min,
                                 maximize=maximize)
    if pick is not None:
        floor = "" if pick["threshold"] is None else (
            f" among the {pick['feasible']} of {len(rows)} settings whose IF is at least {_f(pick['threshold'])} "
            f"({select.if_retention_min:g}% of the general reference's {_f(if_reference)})")
        return {"index": pick["index"], "by": "rule", "feasible": pick["feasible"], "threshold": pick["threshold"],
                "why": f"highest dev {goal}{floor}"}
    scored = [(objective(r), -i) for i, r in enumerate(rows)]
    valid = [(s, i) for s, i in scored if s is not None]
    if not valid:
        raise InputError("no setting has both scores on the dev documents; check scores.if_metric and "
                         "scores.clinical_metrics against the tasks' metrics")
    best = -max(valid)[1]
    threshold = None if if_reference is None or select.if_retention_min is None \
        else if_reference * select.if_retention_min / 100
    why = (f"no setting met the IF floor ({_f(threshold)}) on dev: chosen by the sweep's objective (the highest IF "
           "score, the closest to the floor)" if threshold is not None else
           f"the general reference has no dev IF score to set the floor by: chosen by the sweep's objective ({goal})")
    return {"index": best, "by": "objective", "feasible": 0, "threshold": threshold, "why": why}


# --- step 2: held-out differences against the best method ----------------------------------------------------------


def _relative(results_of, name: str, general: str, domain: str, if_metric: str, parts: Sequence[str]) -> dict:
    s, i, c = (summary_scores(results_of(n), if_metric, parts) for n in (name, general, domain))
    return relative_scores(s, i, c)


def differences(rows: Sequence[dict], refs: dict[str, dict], roles: Roles, if_metric: str, parts: Sequence[str], *,
                seed: int = 0, replicates: int = SWEEP_REPLICATES) -> dict:
    """Per axis (IF retained, clinical gain kept, in points of %): the best method (highest held-out value) and every
    method's paired bootstrap interval of value(method) - value(best), with the same resampled documents for every
    model, references included; "within noise" when the interval holds 0, "behind" when it lies below."""
    refs_of = {f"reference {r}": row.get("per_doc") or {} for r, row in refs.items()}
    models = {**{r["method"]: r.get("per_doc") or {} for r in rows}, **refs_of}
    boot = Bootstrap(models, tasks_of([if_metric, *parts]), replicates=replicates, seed=seed)
    general, domain = f"reference {roles.general}", f"reference {roles.domain}"
    out = {}
    for key in AXES:
        values = {r["method"]: r.get(key) for r in rows if r.get(key) is not None}
        if not values:
            out[key] = None
            continue
        order = [r["method"] for r in rows]
        best = max(values, key=lambda m: (values[m], -order.index(m)))
        specs = [if_metric] if key == "if_retention_pct" else list(parts)
        needs = [general] + ([] if key == "if_retention_pct" else [domain])
        per_method = {}
        for r in rows:
            m = r["method"]
            if m == best:
                per_method[m] = {"value": 0.0, "low": None, "high": None, "verdict": "best"}
                continue
            if r.get(key) is None or not all(boot.covers(n, specs) for n in (m, best, *needs)):
                per_method[m] = {"value": None, "low": None, "high": None,
                                 "verdict": "cannot tell (no per-document scores)"}
                continue

            def stat(results_of, m=m):
                a, b = (_relative(results_of, n, general, domain, if_metric, parts)[key] for n in (m, best))
                return None if a is None or b is None else a - b

            d = boot.interval(stat).as_dict()
            per_method[m] = {**d, "verdict": difference_verdict(d)}
        out[key] = {"best": best, "methods": per_method}
    return out


def difference_verdict(d: dict) -> str:
    if d.get("low") is None or d.get("high") is None:
        return "cannot tell (no per-document scores)"
    if d["low"] <= 0 <= d["high"]:
        return "within noise"
    return "behind" if d["high"] < 0 else "ahead"


# --- the recipe ----------------------------------------------------------------------------------------------------


def load_config(path: str | Path, out: Path, overrides: Sequence[str] = (),
                progress: bool = True) -> tuple[MethodsConfig, dict]:
    """Read the config (+ overrides), build or find the world, expand variables, resolve relative paths."""
    path = Path(path)
    raw, rel, world = read_experiment(path, out, overrides, WHAT, progress)
    if isinstance(raw.get("models"), dict):
        raw["models"] = {k: rel(v) for k, v in raw["models"].items()}
    raw["eval"] = resolve_eval_paths(raw.get("eval"), rel)
    _resolve_per_model_paths(raw.get("methods"), rel)
    calibration = raw.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("data"), list):
        calibration["data"] = [_resolve_spec(spec, rel) for spec in calibration["data"]]
    return validated(MethodsConfig, raw, path), {"world": world, "config_file": str(path.absolute())}


def _resolve_spec(spec: Any, rel) -> Any:
    """'FILE[:N]' with FILE resolved against the config's folder."""
    if not isinstance(spec, str):
        return spec
    path, n = data_spec(spec)
    return str(rel(str(path))) + (f":{n}" if n is not None else "")


# --- statistics of the data-aware methods -----------------------------------------------------------------------


def statistics_plan(cfg: MethodsConfig, out: Path, where: str | Path = WHAT) -> dict[str, dict]:
    """Fill in `stats` for every (setting, role) of a data-aware method that names none, from `calibration:`;
    returns {folder: {role, model, kinds}} of the statistics to compute. A folder's name holds a hash of the
    model's fingerprint, the calibration files' contents and settings, so changed inputs never reuse it (and
    the evaluator's cache, which keys on the merge config, never reuses scores of other statistics)."""
    needed: dict[str, dict] = {}
    for method, settings in cfg.methods.items():
        kind = registry.get(method).spec.stats
        if kind is None:
            continue
        for i, setting in enumerate(settings):
            per_role = setting.get("models") or {}
            for role in (cfg.roles.domain, cfg.roles.general):
                if "stats" in (per_role.get(role) or {}):
                    continue
                if cfg.calibration is None:
                    raise ConfigError(f"{where}: methods.{method}[{i}] needs {kind} statistics of {role}: add "
                                      "`calibration: {data: [FILE, ...]}` (medmerge computes them), or give "
                                      f"`models: {{{role}: {{stats: FOLDER}}}}` from `medmerge stats`")
                folder = out / "stats" / f"{role}-{_statistics_key(cfg, role)}"
                setting.setdefault(CALIBRATED, {})[role] = str(folder)
                entry = needed.setdefault(str(folder), {"role": role, "model": cfg.models[role], "kinds": set()})
                entry["kinds"].add(kind)
    return needed


def _statistics_key(cfg: MethodsConfig, role: str) -> str:
    cal = cfg.calibration
    parts = [fingerprint(cfg.models[role]), str(cal.max_length), str(cfg.seed if cal.seed is None else cal.seed)]
    for spec in cal.data:
        path, n = data_spec(spec)
        if not path.is_file():
            raise InputError(f"calibration.data: {path} does not exist")
        parts += [sha256_file(path), str(n)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def compute_statistics(cfg: MethodsConfig, needed: dict[str, dict], progress: bool) -> list[dict]:
    """`medmerge stats` for each planned folder that does not exist yet (both kinds at once: one pass)."""
    done = []
    cal = cfg.calibration
    for folder, entry in needed.items():
        path = Path(folder)
        if not (path / STATS_RECORD).is_file():
            collect_stats(entry["model"], cal.data, path, kinds=sorted(entry["kinds"] | {"gram", "fisher"}),
                          max_length=cal.max_length, seed=cfg.seed if cal.seed is None else cal.seed,
                          device="cpu" if cfg.device == "auto" else cfg.device, progress_bar=progress)
        record = json.loads((path / STATS_RECORD).read_text())
        done.append({"role": entry["role"], "folder": folder, **{k: record.get(k) for k in (
            "examples", "tokens", "fisher_examples", "data_parts", "max_length")}})
    return done


def _resolve_per_model_paths(methods: Any, rel) -> None:
    """A setting's per-model string values of free-form parameters (a statistics file) made absolute, in place."""
    if not isinstance(methods, dict):
        return
    for method, settings in methods.items():
        if method not in registry.REGISTRY or not isinstance(settings, list):
            continue
        declared = {p.name: p for p in registry.get(method).spec.params}
        for setting in settings:
            per_role = setting.get("models") if isinstance(setting, dict) else None
            if not isinstance(per_role, dict):
                continue
            for values in (v for v in per_role.values() if isinstance(v, dict)):
                for k, v in values.items():
                    p = declared.get(k)
                    if isinstance(v, str) and p is not None and p.choices is None and p.type not in (bool, int, float):
                        values[k] = rel(v)


def run(config: str | Path, out: str | Path, *, overrides: Sequence[str] = (), force: bool = False,
        cache: Optional[Path] = None, progress: bool = True) -> Result:
    """Compare the configured merge methods into OUT; return methods_compared.json's content, with the Markdown
    as `.markdown`. `force` drops OUT's cached results; without it a re-run resumes from them."""
    started = time.perf_counter()
    overrides = list(overrides)
    inputs = experiment_inputs(config, overrides, WHAT)
    raw = apply_overrides(read_yaml(Path(config), WHAT), overrides)
    check_method_names(raw.get("methods"), raw.get("left_out"), config)  # before a world is built
    out = check_run_dir(out, force, results=(), stale=("cache", "stats"), what="methods comparison",
                        written=(resolved_name(NAME), *OUTPUTS), inputs=inputs)
    cfg, info = load_config(config, out, overrides, progress=progress)
    needed = statistics_plan(cfg, out, config)
    points, left_out = plan_methods(cfg, config)
    clear_run_dir(out, force, results=OUTPUTS, stale=("cache", "stats"))  # only now: a refused run deletes nothing
    statistics = compute_statistics(cfg, needed, progress)
    resolved_config(out, NAME).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ev = open_evaluator(cfg, out, cache)
    scorer = Scorer(cfg, ev)
    split_seed = cfg.seed if cfg.split.seed is None else cfg.split.seed
    try:
        dev_sel, held_sel, split_info = split_selections(ev, cfg.split, split_seed)
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None

    # step 1: the references and every setting on dev
    work = [*((role, None, reference_point(role)) for role in cfg.references),
            *((m, i, p) for m, pts in points.items() for i, p in enumerate(pts))]
    dev_refs, dev_rows = {}, []
    for name, i, point in track(work, "dev: references and every setting", progress, label=lambda w: w[2].describe()):
        if i is None:
            dev_refs[name] = scorer.row(ev.score(point, dev_sel), "reference")
        else:
            dev_rows.append({**scorer.row(ev.score(point, dev_sel), "setting"), "setting": i})
    add_relative([*dev_refs.values(), *dev_rows], dev_refs, ev.roles)
    if_reference = dev_refs[cfg.roles.general]["if_score"]
    chosen = {}
    for method, pts in points.items():
        rows = [r for r in dev_rows if r["method"] == method]
        try:
            pick = choose_setting(rows, cfg.select, if_reference, lambda r: scorer.objective(r, dev_refs))
        except InputError as e:
            raise InputError(f"{method}: {e}") from None
        row = rows[pick["index"]]
        row["chosen"] = True
        chosen[method] = {"setting": row["setting"], "label": row["label"], "params": row["params"],
                          "dev_if_score": row["if_score"], "dev_clinical_score": row["clinical_score"], **pick}
        del chosen[method]["index"]

    # step 2: the references and each chosen setting on the held-out documents
    held_work = [*((role, reference_point(role)) for role in cfg.references),
                 *((m, points[m][c["setting"]]) for m, c in chosen.items())]
    held_refs, held_rows = {}, []
    for name, point in track(held_work, "held-out: references and chosen settings", progress,
                             label=lambda w: w[1].describe()):
        if point.method == "reference":
            held_refs[name] = scorer.row(ev.score(point, held_sel), "reference")
        else:
            held_rows.append(scorer.row(ev.score(point, held_sel), "chosen"))
    add_relative([*held_refs.values(), *held_rows], held_refs, ev.roles, scorer.if_metric, scorer.clinical_parts,
                 seed=cfg.seed, replicates=cfg.replicates)
    diffs = differences(held_rows, held_refs, ev.roles, scorer.if_metric, scorer.clinical_parts, seed=cfg.seed,
                        replicates=cfg.replicates)
    maximize = "clinical_score" if cfg.select.maximize == "clinical" else "if_score"
    winner = best_under_constraint(held_rows, if_reference=held_refs[cfg.roles.general]["if_score"],
                                   if_retention_min=cfg.select.if_retention_min, maximize=maximize)

    result = {
        "schema": SCHEMA, "config_file": info["config_file"], "world": info["world"],
        "config": cfg.model_dump(mode="json"), "models": {r: str(p) for r, p in cfg.models.items()},
        "fingerprints": ev.fingerprints, "roles": cfg.roles.model_dump(), "tasks": ev.tasks,
        "if_metric": scorer.if_metric, "clinical_metrics": scorer.clinical_parts, "scale": "0-100 (accuracies x 100)",
        "split": split_info,
        "budget": {"rule": cfg.budget, "per_method": check_budget(cfg, config),
                   "settings": {m: len(p) for m, p in points.items()},
                   "no_parameters": [m for m in points if _one_setting_only(m)]},
        "select": {**cfg.select.model_dump(), "rule": _rule_text(cfg.select, cfg.roles.general)},
        "dev": {"selection": dev_sel.label, "references": dev_refs, "rows": dev_rows},
        "chosen": chosen,
        "held_out": {"selection": held_sel.label, "references": held_refs, "rows": held_rows},
        "differences": diffs,
        "winner": None if winner is None else {"method": held_rows[winner["index"]]["method"],
                                               "threshold": winner["threshold"], "feasible": winner["feasible"]},
        "left_out": left_out,
        "statistics": statistics,
        "seeds": {"seed": cfg.seed, "split": split_seed, "bootstrap": cfg.seed, "replicates": cfg.replicates},
        "evaluations": {"run": ev.stats.evaluated, "cached": ev.stats.cached, "merges": ev.stats.merges,
                        "merge_seconds": round(ev.stats.merge_seconds, 2),
                        "eval_seconds": round(ev.stats.eval_seconds, 2)},
        "device": ev.device, "dtype": ev.dtype, "versions": library_versions(*RECORDED_LIBRARIES),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    markdown = render_markdown(result)
    replace_file(out / f"{NAME}.json", lambda f: f.write_text(json.dumps(result, indent=1, default=str) + "\n"))
    replace_file(out / f"{NAME}.md", lambda f: f.write_text(markdown + "\n"))
    replace_file(out / f"{NAME}.png", lambda f: plot_methods(result, f))
    return Result(result, markdown)


def _rule_text(select: Select, general: str) -> str:
    goal = "the clinical score" if select.maximize == "clinical" else "the IF score"
    if select.if_retention_min is None:
        return f"maximise {goal}"
    return f"maximise {goal} among settings whose IF score is at least {select.if_retention_min:g}% of {general}'s"


# --- what it writes --------------------------------------------------------------------------------------------------


def _setting_text(method: str, label: str) -> str:
    return label.removeprefix(method).strip() or "(no parameters)"


def _difference_cell(d: Optional[dict]) -> str:
    if d is None:
        return "-"
    if d["verdict"] == "best" or d.get("low") is None:
        return d["verdict"]
    return f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] {d['verdict']}"


def methods_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The held-out table (Markdown and `medmerge report` alike): the references, then one row per method."""
    head = ["method", "chosen setting", "IF retained % [95% CI]", "clinical gain kept % [95% CI]", "IF", "clinical",
            "vs best: IF retained", "vs best: gain kept"]
    table = []
    for role, r in result["held_out"]["references"].items():
        table.append([f"{role} (reference)", "-", _f(r.get("if_retention_pct")), _f(r.get("clinical_gain_kept_pct")),
                      _f(r["if_score"]), _f(r["clinical_score"]), "-", "-"])
    diffs = result["differences"]
    for r in result["held_out"]["rows"]:
        m = r["method"]
        cells = [_difference_cell((diffs.get(k) or {}).get("methods", {}).get(m)) for k in AXES]
        fallback = " (fallback)" if result["chosen"][m]["by"] == "objective" else ""
        table.append([m, _setting_text(m, r["label"]) + fallback,
                      fmt_with_ci(r.get("if_retention_pct"), r.get("if_retention_ci"), "-"),
                      fmt_with_ci(r.get("clinical_gain_kept_pct"), r.get("clinical_gain_kept_ci"), "-"),
                      _f(r["if_score"]), _f(r["clinical_score"]), *cells])
    return head, table


def _points(v: float) -> str:
    return f"{abs(v):.1f} point{'' if abs(v) == 1 else 's'}"


def summary_paragraphs(result: dict) -> list[str]:
    """What the held-out numbers say, written from them: who leads each axis, by how much, where it is noise."""
    rows = {r["method"]: r for r in result["held_out"]["rows"]}
    n = min((d["held_out"] for d in result["split"]["documents"].values()), default=0)
    out = []
    for key, axis in AXES.items():
        d = result["differences"].get(key)
        if not d:
            out.append(f"On {axis} no method has a value (the references' scores leave it undefined).")
            continue
        best = d["best"]
        r = rows[best]
        ci = r.get("if_retention_ci" if key == "if_retention_pct" else "clinical_gain_kept_ci")
        text = f"On {axis}, `{best}` leads with {fmt_with_ci(r[key], ci)}%."
        others = [(m, x) for m, x in d["methods"].items() if m != best]
        noise = [(m, x) for m, x in others if x["verdict"] == "within noise"]
        behind = sorted(((m, x) for m, x in others if x["verdict"] == "behind"), key=lambda mx: mx[1]["value"])
        unknown = [m for m, x in others if x["verdict"].startswith("cannot tell")]
        if not others:
            text += " It is the only method compared."
        elif len(noise) == len(others):
            text += (f" No other method is distinguishable from it at {n} held-out documents per task: every "
                     "difference's 95% paired interval contains 0 ("
                     + "; ".join(f"{m} {x['value']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]" for m, x in noise) + ").")
        else:
            if noise:
                text += (" Within noise of it (the 95% paired interval of the difference contains 0): "
                         + "; ".join(f"{m} ({x['value']:+.1f}, [{x['low']:+.1f}, {x['high']:+.1f}])" for m, x in noise)
                         + ".")
            if behind:
                text += (" Behind it beyond noise: " + "; ".join(
                    f"{m} by {_points(x['value'])} [{abs(x['high']):.1f}, {abs(x['low']):.1f}]" for m, x in behind)
                    + ".")
        ahead = [m for m, x in others if x["verdict"] == "ahead"]
        if ahead:
            text += f" Ahead of it on the resampled documents although behind on the full set: {', '.join(ahead)}."
        if unknown:
            text += f" No interval for {', '.join(unknown)} (no per-document scores)."
        out.append(text)
    w = result.get("winner")
    sel = result["select"]
    if w:
        r = rows[w["method"]]
        out.append(f"Under the selection rule ({sel['rule']}), the best method on the held-out documents is "
                   f"`{w['method']}` (IF retained {fmt_with_ci(r['if_retention_pct'], r.get('if_retention_ci'))}%, "
                   f"clinical gain kept {fmt_with_ci(r['clinical_gain_kept_pct'], r.get('clinical_gain_kept_ci'))}%; "
                   f"{w['feasible']} of {len(rows)} methods meet its IF floor there).")
    else:
        out.append(f"Under the selection rule ({sel['rule']}), no method's chosen setting meets it on the held-out "
                   "documents.")
    fallback = [m for m, c in result["chosen"].items() if c["by"] == "objective"]
    if fallback:
        out.append(f"No dev setting of {', '.join(fallback)} met the IF floor: their settings were chosen by the "
                   "sweep's objective (see Chosen on dev), marked (fallback).")
    return out


def render_markdown(result: dict) -> str:
    split = result["split"]
    budget = result["budget"]
    lines = [f"# Merge methods compared ({len(result['held_out']['rows'])} methods)", "",
             f"IF = {result['if_metric']}; clinical = mean of {', '.join(result['clinical_metrics'])}; scale "
             f"{result['scale']}. IF retained = 100 x IF / IF({result['roles']['general']}); clinical gain kept = "
             f"100 x (C - C({result['roles']['general']})) / (C({result['roles']['domain']}) - "
             f"C({result['roles']['general']})).",
             f"Each method's setting was chosen on the dev documents ({split['dev']} per task) by: "
             f"{result['select']['rule']}; every row below is scored on the held-out documents "
             f"({_held_out_text(split)}, split seed {split['seed']}), disjoint from dev.",
             _budget_text(budget), ""]
    head, table = methods_table(result)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", "Intervals: 95% paired bootstrap over the held-out documents (each task resampled on its own; "
              "the method, the best method and the references resampled together); vs best: the difference in "
              "points of %, \"within noise\" when its interval contains 0.", ""]
    lines += [p + "\n" for p in summary_paragraphs(result)]
    lines += ["## Chosen on dev", "", "| method | settings | chosen | dev IF | dev clinical | why |",
              "|---|---|---|---|---|---|"]
    for m, c in result["chosen"].items():
        lines.append(f"| {m} | {budget['settings'][m]} | {_setting_text(m, c['label'])} | {_f(c['dev_if_score'])} | "
                     f"{_f(c['dev_clinical_score'])} | {c['why']} |")
    lines += ["", "## Left out", ""]
    lines += [f"- {x['method']}: {x['reason']}" for x in result["left_out"]] or ["- none"]
    e = result["evaluations"]
    lines += ["", f"Evaluations run {e['run']}, from cache {e['cached']}; merges {e['merges']} "
              f"({e['merge_seconds']} s), evaluation {e['eval_seconds']} s; wall {result['wall_time_s']} s."]
    return "\n".join(lines)


def _budget_text(budget: dict) -> str:
    n = budget["per_method"]
    exempt = budget.get("no_parameters") or []
    unequal = {m: k for m, k in budget["settings"].items() if k != (1 if m in exempt else n)}
    text = f"Budget: {n} setting{'s' if n != 1 else ''} per method"
    if exempt:
        text += f" ({', '.join(exempt)}: 1, {'it has' if len(exempt) == 1 else 'they have'} no parameters)"
    if unequal:
        text += ("; unequal budgets, allowed by the config (budget: unequal_ok): "
                 + ", ".join(f"{m} {k}" for m, k in unequal.items()))
    return text + "."


def _held_out_text(split: dict) -> str:
    sizes = sorted({d["held_out"] for d in split["documents"].values()})
    return f"{sizes[0]} per task" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} per task"


def plot_methods(result: dict, path: Path) -> None:
    """IF retained (x) against clinical gain kept (y) on held-out documents: one labelled point per method with both
    bootstrap intervals as error bars, the references as stars, the IF floor as a dotted line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.colormaps["tab20"]  # twenty methods and more: tab10's colours would repeat
    for i, r in enumerate(result["held_out"]["rows"]):
        x, y = r.get("if_retention_pct"), r.get("clinical_gain_kept_pct")
        if x is None or y is None or not all(map(math.isfinite, (x, y))):
            continue
        err = [[[v - ci["low"]], [ci["high"] - v]] if ci and ci.get("low") is not None else None
               for v, ci in ((x, r.get("if_retention_ci")), (y, r.get("clinical_gain_kept_ci")))]
        ax.errorbar([x], [y], xerr=err[0], yerr=err[1], fmt="o", color=colors(i % 20), capsize=3, ms=5, lw=1)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for role, r in result["held_out"]["references"].items():
        x, y = r.get("if_retention_pct"), r.get("clinical_gain_kept_pct")
        if x is not None and y is not None:
            ax.scatter([x], [y], marker="*", s=220, color="black", zorder=5)
            ax.annotate(f"{role} (reference)", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    floor = result["select"].get("if_retention_min")
    if floor is not None:
        ax.axvline(floor, color="grey", lw=0.8, ls=":", label=f"IF floor: {floor:g}% of {result['roles']['general']}")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"IF retained (% of {result['roles']['general']}'s IF score)")
    ax.set_ylabel(f"clinical gain kept (% of the {result['roles']['domain']} - {result['roles']['general']} gap)")
    ax.set_title("merge methods on held-out documents (chosen setting each; 95% paired bootstrap)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
