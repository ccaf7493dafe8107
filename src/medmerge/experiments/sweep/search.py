"""`medmerge sweep --search optuna`: multi-objective search over continuous merge parameters.

Objectives: instruction following and the clinical composite, both maximised
(NSGA-II by default; TPE or random). Parameters: `search.space` ([low, high]
per parameter, e.g. t and density), one method or a categorical choice among
`search.methods`; with `layer_groups: G > 1`, t is searched per group of
layers and applied as a per-layer gradient of G values.

Several workers share one study through `--storage` (sqlite for processes on
one machine, postgresql:// for several machines): run the same command in each,
with a distinct `--worker K`. Worker K's sampler is seeded with seed + K (so two
workers never propose the same sequence, and a single worker is reproducible).
The study stops at exactly `trials` completed trials: a trial whose number
ranks past the budget (counting running and finished trials created before it)
is pruned at once, before any evaluation.

optuna is imported inside the functions that use it, on purpose: a grid sweep never pays for it.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from ...errors import ConfigError
from ...runtime import progress as progress_bar
from .config import Search, SweepConfig
from .evaluator import Selection, SweepEvaluator
from .points import Point, layer_gradient

STARTUP_ATTEMPTS = 5


def make_sampler(search: Search, seed: int):
    import optuna

    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=search.population)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def suggest(trial, search: Search) -> Point:
    """The trial's point: method (categorical when several), its space, per-layer-group t."""
    method = search.methods[0] if len(search.methods) == 1 else trial.suggest_categorical("method", search.methods)
    params = dict(search.fixed)
    for name, (low, high) in search.space.items():
        if name == "t" and search.layer_groups > 1:
            params["t"] = layer_gradient([trial.suggest_float(f"t_g{g}", low, high) for g in range(search.layer_groups)])
        elif name == "t" and method == "model_stock":
            continue
        else:
            params[name] = round(trial.suggest_float(name, low, high), 6)
    if "t" in params and not isinstance(params["t"], list):
        params["t"] = round(float(params["t"]), 6)
    return Point(method=method, params=params)


def open_study(search: Search, out: Path, seed: int, worker: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = search.storage or f"sqlite:///{out / 'study.db'}"
    sampler = make_sampler(search, seed + worker)
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            study = optuna.create_study(study_name=search.study, storage=storage, load_if_exists=True,
                                        directions=["maximize", "maximize"], sampler=sampler)
            break
        except Exception as e:  # a bad URL or an unreachable server: say which and how to fix it
            if attempt + 1 < STARTUP_ATTEMPTS and _startup_race(e):
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the schema: it exists in a moment
                continue
            raise ConfigError(f"search.storage {storage!r}: cannot open the study ({e}); use sqlite:///PATH.db or "
                              "postgresql://USER:PASS@HOST/DB") from None
    study.set_user_attr("objectives", ["if_score", "clinical_score"])
    return study, storage


def _startup_race(e: Exception) -> bool:
    """Workers started together both create the storage's tables; the one that loses sees them appear."""
    text = str(e).lower()
    return "already exists" in text or "database is locked" in text or "unique constraint" in text


def _budget_rank(study, trial) -> int:
    """How many live (running or finished) trials were created before this one."""
    from optuna.trial import TrialState

    live = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.WAITING))
    return sum(1 for t in live if t.number < trial.number)


def run_search(cfg: SweepConfig, ev: SweepEvaluator, scorer, out: Path, sel: Selection, log, *, worker: int = 0,
               progress: bool = True) -> tuple[list[dict], dict]:
    import optuna
    from optuna.trial import TrialState

    search = cfg.search
    for method in search.methods:
        Point(method=method, params={**search.fixed, **{k: lo for k, (lo, _) in search.space.items()}}) \
            .merge_config(ev.roles, cfg.seed)  # fail now on an unknown method or parameter
    study, storage = open_study(search, out, cfg.seed, worker)
    logging.getLogger("optuna").setLevel(logging.WARNING)

    def objective(trial):
        if _budget_rank(study, trial) >= search.trials:
            trial.set_user_attr("pruned_because", "the study's trial budget was reached")
            study.stop()
            raise optuna.TrialPruned()
        point = suggest(trial, search)
        row = scorer.row(ev.score(point, sel), "search")
        row["trial"] = trial.number
        row["worker"] = worker
        trial.set_user_attr("row", row)
        log.add(row)
        if row["if_score"] is None or row["clinical_score"] is None:
            raise ConfigError(f"trial {trial.number}: the scores are missing ({row['tasks']}); check scores:")
        return row["if_score"], row["clinical_score"]

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done < search.trials:
        with progress_bar(progress) as bar:
            task = bar.add_task(f"optuna {search.sampler} (worker {worker})", total=search.trials, completed=done)

            def advance(study_, trial_):
                bar.update(task, completed=len(study_.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))

            study.optimize(objective, n_trials=search.trials, callbacks=[advance], catch=())
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [t.user_attrs["row"] for t in sorted(complete, key=lambda t: t.number)]
    info = {"sampler": search.sampler, "study": search.study, "storage": _redact(storage), "trials": search.trials,
            "completed": len(complete), "worker": worker, "seed": cfg.seed + worker,
            "pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
            "space": search.space, "methods": search.methods, "layer_groups": search.layer_groups,
            "workers": sorted({t.user_attrs["row"].get("worker", 0) for t in complete})}
    return rows, info


def _redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)
