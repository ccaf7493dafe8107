"""`medmerge sweep` configuration (SWEEP.yml).

    world: {preset: quick}                 # optional: the synthetic world; ${world} expands below
    models:                                # role -> local model folder
      base: ${world}/models/base           #   the shared ancestor (task-vector methods)
      clinical: ${world}/models/clinical   #   the domain model: t is its share
      instruct: ${world}/models/instruct   #   the general instruct model: 1 - t
    roles: {domain: clinical, general: instruct, base: base}
    references: [instruct, clinical]       # evaluated as they are; retention is relative to these
    grid:
      - {method: linear, t: [0, 0.25, 0.5, 0.75, 1]}
      - {method: ties, t: [0.3, 0.5, 0.7], density: [0.5, 0.8]}
      - {method: slerp, t: [[0.2, 0.8]]}   # a list value is a per-layer gradient
      - {config: {merge_method: task_arithmetic, base_model: base, models: [...]}, label: my-point}
    eval: {tasks: [...], limit: 100, subset: null, batch_size: 16, max_new_tokens: 64}
    scores:
      if_metric: mm_ifeval/mean            # I: instruction following (TASK/METRIC or TASK/mean)
      clinical_metrics: [mm_pubmedqa/acc, mm_mts_dialog/composite]   # C: their mean (0-100 scale)
    select: {if_retention_min: 95, maximize: clinical}
    halving: {rungs: [0.25, 0.5, 1.0], keep: 0.5, check: false}
    search: {sampler: nsga2, trials: 40, methods: [ties], space: {t: [0, 1], density: [0.2, 1]}, layer_groups: 2}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from ...errors import ConfigError, InputError
from ...io.paths import safe_name
from ...settings import Strict, validated
from ...training.config import Seed
from ..config import EvalSettings, WorldSettings, read_experiment, resolve_eval_paths
from .points import Point, Roles, check_point, expand_grid

class RoleNames(Strict):
    domain: str = "clinical"
    general: str = "instruct"
    base: str = "base"


class SweepEval(EvalSettings):
    subset: Optional[int] = Field(None, ge=1)  # a fixed, seeded dev subset of N documents per task
    batch_size: int = Field(16, ge=1)


class Scores(Strict):
    if_metric: str = "mm_ifeval/mean"
    clinical_metrics: list[str] = []  # default: every other task's composite or acc (as `medmerge compare`)


class Select(Strict):
    if_retention_min: Optional[float] = Field(95.0, ge=0)  # % of the general (instruct) reference's IF score
    maximize: Literal["clinical", "if"] = "clinical"


class Halving(Strict):
    rungs: list[float] = [0.25, 0.5, 1.0]  # shares of the evaluation set, increasing, ending at 1
    keep: float = Field(0.5, gt=0, lt=1)  # share of candidates promoted to the next rung
    check: bool = False  # also score every candidate on the full set, to measure how well the cheap ranking agreed

    @model_validator(mode="after")
    def _rungs(self):
        r = self.rungs
        if not r or any(not 0 < x <= 1 for x in r) or sorted(r) != r or len(set(r)) != len(r) or r[-1] != 1.0:
            raise ValueError("rungs must increase strictly, lie in (0, 1] and end at 1.0, e.g. [0.25, 0.5, 1.0]")
        return self


class Search(Strict):
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    trials: int = Field(20, ge=1)
    methods: list[str] = ["ties"]
    space: dict[str, list[float]] = {"t": [0.0, 1.0]}  # parameter -> [low, high]
    fixed: dict[str, Any] = {}  # parameters held constant (e.g. lambda: 1.0)
    layer_groups: int = Field(1, ge=1)  # > 1: t is searched per group of layers (a per-layer gradient)
    study: str = "medmerge-sweep"
    storage: Optional[str] = None  # default sqlite:///OUT/study.db
    population: int = Field(8, ge=2)  # NSGA-II population size
    # seconds between a running trial's heartbeats (whole seconds, as optuna stores them); a trial silent for
    # 2 x heartbeat (its worker killed, its machine lost) is failed and queued once more (search.run_search)
    heartbeat: int = Field(60, ge=1, le=3600)

    @model_validator(mode="after")
    def _space(self):
        for name, bounds in self.space.items():
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"space.{name} must be [low, high] with low < high")
        if not self.methods:
            raise ValueError("methods is empty")
        return self


def check_models_and_tasks(cfg, scored: str) -> None:
    """The roles and references name models of `cfg.models`, and there are tasks to score each `scored` on
    (a sweep's or a methods comparison's config)."""
    for name in (cfg.roles.domain, cfg.roles.general):
        if name not in cfg.models:
            raise ValueError(f"roles: {name!r} is not in models ({', '.join(cfg.models)})")
    for ref in cfg.references:
        if ref not in cfg.models:
            raise ValueError(f"references: {ref!r} is not in models ({', '.join(cfg.models)})")
    if not cfg.eval.tasks and not cfg.eval.task_files:
        raise ValueError(f"eval.tasks is empty: name the tasks every {scored} is scored on")


class SweepConfig(Strict):
    world: Optional[WorldSettings] = None
    models: dict[str, Path]
    roles: RoleNames = RoleNames()
    references: list[str] = ["instruct", "clinical"]
    load: Optional[str] = None  # the model whose architecture/tokenizer is loaded (default: roles.general)
    grid: list[dict[str, Any]] = []
    eval: SweepEval
    scores: Scores = Scores()
    select: Select = Select()
    halving: Optional[Halving] = None
    search: Optional[Search] = None
    seed: Seed = 0
    dtype: Optional[str] = None  # the loaded model's and the merges' dtype (default float32)
    device: str = "auto"

    @model_validator(mode="after")
    def _consistent(self):
        check_models_and_tasks(self, "point")
        if self.eval.subset is not None and self.eval.limit is not None and self.eval.subset > self.eval.limit >= 1:
            raise ValueError("eval.subset is larger than eval.limit")
        return self


def load_config(path: str | Path, out: Path, overrides: list[str] = (), progress: bool = True) -> tuple[SweepConfig, dict]:
    """Read SWEEP.yml (+ overrides), build or find the world, expand variables, resolve relative paths."""
    path = Path(path)
    raw, rel, world = read_experiment(path, out, overrides, "sweep config", progress)
    if isinstance(raw.get("models"), dict):
        raw["models"] = {k: rel(v) for k, v in raw["models"].items()}
    raw["eval"] = resolve_eval_paths(raw.get("eval"), rel)
    cfg = validated(SweepConfig, raw, path)
    if not cfg.grid and cfg.search is None:
        raise ConfigError(f"{path}: nothing to do: add a `grid:` of points or a `search:` section")
    check_sweep(cfg, path)
    return cfg, {"world": world, "config_file": str(path.absolute())}


def check_names(cfg: SweepConfig, where: str | Path = "sweep config") -> None:
    """Every name of the config that is, or may become, a path component under OUT is a safe folder name:
    model (role) names, roles, references, `load`, grid labels, the search's study and its methods."""
    names = [("model name (a key of models:)", r) for r in cfg.models]
    names += [(f"roles.{k}", v) for k, v in cfg.roles.model_dump().items()]
    names += [(f"references[{i}]", r) for i, r in enumerate(cfg.references)]
    names += [("load", cfg.load)] if cfg.load is not None else []
    for i, entry in enumerate(cfg.grid):
        if entry.get("label") is not None:
            names.append((f"grid[{i}].label", entry["label"]))
        if isinstance(entry.get("method"), str):
            names.append((f"grid[{i}].method", entry["method"]))
    if cfg.search is not None:
        names.append(("search.study", cfg.search.study))
        names += [(f"search.methods[{i}]", m) for i, m in enumerate(cfg.search.methods)]
    for what, name in names:
        try:
            safe_name(name, what)
        except InputError as e:
            raise ConfigError(f"{where}: {e}") from None


def _search_corners(search: Search) -> list[Point]:
    """Points at the low and the high corner of the search space, for each method (what `suggest` can propose)."""
    points = []
    for method in search.methods:
        for side in (0, 1):
            params = dict(search.fixed)
            for name, bounds in search.space.items():
                if name == "t" and method == "model_stock":
                    continue
                value = bounds[side]
                params[name] = [value] * search.layer_groups if name == "t" and search.layer_groups > 1 else value
            points.append(Point(method=method, params=params))
    return points


def check_sweep(cfg: SweepConfig, where: str | Path = "sweep config") -> list[Point]:
    """The whole config, before any model is opened or any reference evaluated; returns the grid's points.

    Names (`check_names`), then every grid point and both corners of the search space through
    `points.check_point`: method names, numbers where numbers are expected, t a share, every value
    in its method's domain, merge configs naming only the sweep's models.
    """
    check_names(cfg, where)
    roles = Roles(**cfg.roles.model_dump())
    try:
        points = expand_grid(cfg.grid)
        for point in points:
            check_point(point, roles, list(cfg.models), cfg.seed, cfg.dtype)
        if cfg.search is not None:
            for point in _search_corners(cfg.search):
                try:
                    check_point(point, roles, list(cfg.models), cfg.seed, cfg.dtype)
                except ConfigError as e:
                    raise ConfigError(f"search (space {cfg.search.space}, fixed {cfg.search.fixed}): {e}") from None
        # search.storage (the study's URL) is not checked here: search.check_storage (search.py) does, in run()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return points
