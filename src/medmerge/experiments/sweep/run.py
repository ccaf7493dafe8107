"""`medmerge sweep SWEEP.yml --out DIR`: score merges in memory over a grid (or a search), pick the best.

The recipe: read the config (and build or find its world) -> open the evaluator (one loaded
model, the inputs read once, the result cache) -> score the references -> score the grid
(every point, or successive halving) or run the optuna search -> the Pareto front and the
best point under the IF-retention rule -> outputs (`outputs.py`) -> optionally export the
best merge with the streaming engine.

Outputs in DIR:

- `sweep.jsonl`: one line per point (`method`, `params`, the merge `config` with role
  names, `tasks` scores, `if_score`, `clinical_score`, retention and gain kept, cache state);
- `sweep_summary.json`: references, the Pareto front, the best point under the
  constraint, successive-halving rungs and rank agreement, counts, versions;
- `sweep.md`, `pareto.png`, `scores_vs_t.png`;
- `sweep.resolved.yml`: the config as run (never written over the config file, which may be kept in DIR);
- `cache/`: one JSON file per (point, task, documents, generation settings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import yaml

from ...errors import ConfigError, InputError
from ...io.paths import under
from ...io.writer import check_output
from ...merging import merge
from ...runtime import track
from ..config import experiment_inputs
from ..rundir import Result, check_run_dir, clear_run_dir, resolved_config, resolved_name
from .config import Search, SweepConfig, check_sweep, load_config
from .evaluator import SweepEvaluator
from .halving import successive_halving
from .outputs import SweepLog, summarize, write_outputs
from .points import Roles, with_paths
from .scoring import Scorer, add_relative, reference_point
from .search import check_storage, run_search


def open_evaluator(cfg: SweepConfig, out: Path, cache: Optional[Path] = None) -> SweepEvaluator:
    roles = Roles(**cfg.roles.model_dump())
    kw = cfg.eval.kwargs(cfg.seed)
    kw.pop("device")
    limit = kw.pop("limit")
    return SweepEvaluator(cfg.models, roles=roles, tasks=cfg.eval.tasks, eval_kwargs=kw,
                          cache_dir=cache or under(out, "cache", what="cache folder"), seed=cfg.seed, load=cfg.load,
                          dtype=cfg.dtype,
                          device=cfg.device if cfg.eval.device == "auto" else cfg.eval.device,
                          limit=limit, subset=cfg.eval.subset)


def run(config: str | Path, out: str | Path, *, overrides: list[str] = (), force: bool = False,
        export_best: Optional[str | Path] = None, export_force: bool = False, search: Optional[str] = None,
        trials: Optional[int] = None, storage: Optional[str] = None, worker: int = 0, cache: Optional[Path] = None,
        limit: Optional[float] = None, subset: Optional[int] = None, progress: bool = True) -> Result:
    """Run a sweep (grid, halving or optuna search) into OUT; return the summary, with sweep.md as `.markdown`.

    `limit` and `subset` override the config's `eval.limit` / `eval.subset`; `force` drops OUT's cached results.
    """
    overrides = list(overrides) + ([f"eval.limit={limit}"] if limit is not None else []) \
        + ([f"eval.subset={subset}"] if subset is not None else [])
    if search not in (None, "grid", "optuna"):
        raise ConfigError(f"--search must be optuna (or grid), not {search!r}")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"--trials {trials!r}: use a whole number of trials >= 1")
    inputs = experiment_inputs(config, overrides, "sweep config")  # the config is read before OUT is looked at
    if export_best is not None:  # before any work: the export must not be, hold or lie in the run or an input
        check_output(Path(export_best).absolute(), export_force, [out, *inputs])
    out = check_run_dir(out, force, results=(), stale=("cache",), what="sweep",
                        written=(resolved_name("sweep"), "sweep_summary.json", "sweep.md"),
                        inputs=inputs)
    started = time.perf_counter()
    cfg, info = load_config(config, out, overrides, progress=progress)
    if search == "optuna":
        if cfg.search is None:
            cfg.search = Search()
        if trials is not None:
            cfg.search.trials = trials
        if storage is not None:
            cfg.search.storage = storage
    # The whole config is checked before any model is opened or any reference evaluated: names, methods,
    # every grid value and the search space against the methods' domains (again: --search may add a search).
    points = check_sweep(cfg, config)
    if search != "optuna" and not points:
        raise ConfigError(f"{config}: grid: is empty (or pass --search optuna with a search: section)")
    if search == "optuna":  # a bad --storage / search.storage (scheme, driver, sqlite folder) is refused now too
        check_storage(cfg.search.storage)
    clear_run_dir(out, force, results=(), stale=("cache",))  # only now: a sweep refused above deletes nothing
    resolved_config(out, "sweep").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ev = open_evaluator(cfg, out, cache)
    scorer = Scorer(cfg, ev)
    base_sel = ev.selection(**ev.base_selection)
    log = SweepLog(under(out, "sweep.jsonl", what="sweep log"))

    refs = {}
    for role in cfg.references:
        row = scorer.row(ev.score(reference_point(role), base_sel), "reference")
        refs[role] = row
        log.add(row)
    halving = None
    if search == "optuna":
        rows, search_info = run_search(cfg, ev, scorer, out, base_sel, log, worker=worker, progress=progress)
    else:
        search_info = None
        if cfg.halving is not None:
            rows, halving = successive_halving(cfg, ev, scorer, points, refs, log, progress)
        else:
            rows = []
            for point in track(points, "sweep", progress, label=lambda p: p.describe()):
                row = scorer.row(ev.score(point, base_sel), "grid")
                rows.append(row)
                log.add(row)
    all_rows = list(refs.values()) + rows
    add_relative(all_rows, refs, ev.roles, scorer.if_metric, scorer.clinical_parts, seed=cfg.seed)
    summary = summarize(cfg, info, ev, scorer, all_rows, refs, halving, search_info, started)
    markdown = write_outputs(out, all_rows, summary)
    if export_best is not None:
        best = summary.get("best")
        if not best:
            raise InputError("no point meets the selection rule (select:): nothing to export; see sweep.md")
        summary["exported"] = export(cfg, best["config"], Path(export_best), force=export_force, progress=progress)
        under(out, "sweep_summary.json", what="sweep summary").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return Result(summary, markdown)


def export(cfg: SweepConfig, config: dict, target: Path, *, force: bool, progress: bool) -> dict:
    """Write a point's merge to disk with the streaming engine (sharded, atomic, verified)."""
    disk = with_paths(config, cfg.models)
    res = merge(disk, target, force=force, progress=progress)
    return {"path": str(target), "verified": bool(res.verification and res.verification.ok), "config": disk}
