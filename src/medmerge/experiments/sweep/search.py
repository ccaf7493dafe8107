"""`medmerge sweep --search optuna`: multi-objective search over continuous merge parameters.

Objectives: instruction following and the clinical composite, both maximised
(NSGA-II by default; TPE or random). Parameters: `search.space` ([low, high]
per parameter, e.g. t and density), one method or a categorical choice among
`search.methods`; with `layer_groups: G > 1`, t is searched per group of
layers and applied as a per-layer gradient of G values.

Several workers share one study through `--storage` (sqlite for processes on
one machine, postgresql:// for several machines, with its driver: pip install
'psycopg[binary]'): run the same command in each, with a distinct `--worker K`.
They may start at the same instant: the storage's tables and the study are
created under a lock (`open_study`). Worker K's sampler is seeded with seed + K
(so two workers never propose the same sequence, and a single worker is reproducible).

The study stops at exactly `trials` completed trials, even when a worker dies (killed, out of memory, its
machine lost) in the middle of a trial:
- a running trial records a heartbeat every `search.heartbeat` seconds; one silent for twice as long is
  failed by the next worker that looks (optuna's `fail_stale_trials`) and queued once more with the same
  parameters (`STALE_RETRIES`);
- a trial whose number ranks past the budget (counting the running, waiting and complete trials created
  before it) is pruned at once, before any evaluation; and a worker starts a trial only while fewer than
  `trials` are live. When `trials` are live but fewer are complete, it waits (`_wait_for_a_slot`) until they
  are all complete (then it stops) or one is failed (then it takes the freed slot), instead of stopping
  early: the trial it waits for may be a dead worker's.

optuna is imported inside the functions that use it, on purpose: a grid sweep never pays for it.
"""

from __future__ import annotations

import fcntl
import logging
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ...errors import ConfigError
from ...runtime import note
from ...runtime import progress as progress_bar
from .config import Search, SweepConfig
from .evaluator import Selection, SweepEvaluator
from .points import Point, layer_gradient


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


def check_storage(url: str | None) -> None:
    """Refuse a storage URL that cannot work, cheaply (no connection): scheme, driver, sqlite folder.

    None is the default, sqlite:///OUT/study.db, which always works. Run before any model is loaded.
    """
    if url is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = _redact(url)
    use = "use sqlite:///PATH.db (workers on one machine) or postgresql://USER:PASS@HOST/DB (several machines)"
    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError(f"search.storage {shown!r} is not a database URL; {use}") from None
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"search.storage {shown!r}: {backend!r} databases are not supported; {use}")
    driver = u.get_driver_name()  # postgresql:// means psycopg (SQLAlchemy >= 2.1) or psycopg2 (older)
    try:
        dialect = u.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:
        raise ConfigError(f"search.storage {shown!r}: unknown {backend} driver {driver!r}; {use}") from None
    except ImportError as e:
        hint = {"psycopg": "pip install 'psycopg[binary]'", "psycopg2": "pip install psycopg2-binary"}.get(
            driver, f"install the Python package of the {driver} driver")
        raise ConfigError(f"search.storage {shown!r}: the {backend} driver {driver!r} is not installed ({e}); "
                          f"{hint}") from None
    if getattr(dialect, "is_async", False):
        raise ConfigError(f"search.storage {shown!r}: {driver} is an asyncio driver, which optuna cannot use; "
                          f"use postgresql+psycopg:// or postgresql+psycopg2://")
    if backend == "sqlite":
        if not u.database or u.database == ":memory:" or u.database.startswith("file:"):
            raise ConfigError(f"search.storage {shown!r}: workers share the study through a file; "
                              "use sqlite:///PATH.db")
        folder = Path(u.database).parent
        if not folder.is_dir():
            raise ConfigError(f"search.storage {shown!r}: the folder {folder} does not exist; create it "
                              "(mkdir -p) or point the storage at an existing folder")


def open_study(search: Search, out: Path, seed: int, worker: int):
    """Create the study (and the storage's tables) or join it: safe for any number of workers started at once.

    optuna's RDBStorage() creates the tables unlocked (SQLAlchemy's metadata.create_all: look, then CREATE
    TABLE) and stamps the alembic schema version (look, then INSERT): workers doing it at once fail with
    "table studies already exists" or "UNIQUE constraint failed: alembic_version.version_num". So the writes
    at start-up (the tables and version stamp, then the study) are made holding a lock: an flock on
    PATH.db.lock beside a sqlite file, a pg_advisory_lock on PostgreSQL. The first worker creates; the others
    wait, find everything there and load it. The schema version check (slow: alembic reads its ~30
    migration scripts) only reads, so it runs outside the lock, in parallel.

    The storage records each running trial's heartbeat every `search.heartbeat` seconds (a thread of
    `study.optimize`) and fails a trial silent for 2 x heartbeat, then queues it again (`_retry_stale`).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = search.storage or f"sqlite:///{out / 'study.db'}"
    check_storage(storage)
    sampler = make_sampler(search, seed + worker)
    kw = _engine_kwargs(storage)
    try:
        with _schema_lock(storage):
            optuna.storages.RDBStorage(storage, engine_kwargs=kw, skip_compatibility_check=True).engine.dispose()
        with warnings.catch_warnings():  # optuna marks heartbeats experimental: the warning would print per worker
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=kw, skip_table_creation=True,
                                             heartbeat_interval=search.heartbeat, grace_period=2 * search.heartbeat,
                                             heartbeat_stale_trial_callback=_retry_stale(2 * search.heartbeat, storage))
        with _schema_lock(storage):
            study = _create_or_load(search.study, rdb, sampler)
        study.set_user_attr("objectives", ["if_score", "clinical_score"])
    except Exception as e:  # noqa: BLE001 - an unreachable server, a refused login, an old schema: say which
        raise ConfigError(f"search.storage {_redact(storage)!r}: cannot open the study {search.study!r} ({e}); "
                          "check that the database is reachable, or use sqlite:///PATH.db or "
                          "postgresql://USER:PASS@HOST/DB") from None
    return study, storage


SQLITE_TIMEOUT_S = 120  # a sqlite writer waits this long for another's lock instead of "database is locked"
PG_LOCK_KEY = 0x6D65646D65726765  # pg_advisory_lock key ("medmerge"): one per database, held while opening


def _engine_kwargs(url: str) -> dict:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and "timeout" not in u.query:
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    return {}


@contextmanager
def _schema_lock(url: str):
    """Hold a lock, across processes (and machines, for PostgreSQL), while the storage is created or opened."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        with open(f"{u.database}.lock", "a") as f:  # left in place: removing a lock file races its next user
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
                try:  # a session lock: also released if the connection drops
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
        finally:
            engine.dispose()


def _create_or_load(name: str, rdb, sampler):
    """The study, created if it is not there yet; loaded if another process created it meanwhile."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    try:
        return optuna.create_study(study_name=name, storage=rdb, load_if_exists=True,
                                   directions=["maximize", "maximize"], sampler=sampler)
    except (optuna.exceptions.DuplicatedStudyError, IntegrityError):  # created meanwhile, without the lock
        return optuna.load_study(study_name=name, storage=rdb, sampler=sampler)


# A point whose evaluation kills its worker (out of memory) would kill every worker in turn if a stale trial
# were retried without end; one retry covers the common case, a worker preempted or its machine lost.
STALE_RETRIES = 1
WAIT_POLL_MAX_S = 2  # a worker waiting for a slot looks at the study every min(heartbeat / 2, this) seconds


def _retry_stale(grace: int, storage: str):
    """The storage's stale-trial callback: say which trial was failed, and queue it again (up to STALE_RETRIES).

    optuna's RetryHeartbeatStaleTrialCallback adds a WAITING trial with the failed one's parameters (a new
    number); the next worker's `study.ask()` takes it. Several workers may fail the same stale trial at once
    (on sqlite optuna's check-and-set lets two succeed), so the retry is queued under the storage's lock
    (`_schema_lock`) and only when no trial retries it yet: one retry per failed trial, said once.
    """
    import optuna

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES)

    def stale(study, trial) -> None:
        with _schema_lock(storage):
            if any(t.system_attrs.get("failed_trial") == trial.number for t in study.get_trials(deepcopy=False)):
                return  # another worker failed it too, and queued its retry already
            again = len(trial.system_attrs.get("retry_history", [])) < STALE_RETRIES
            note(f"optuna trial {trial.number} failed: its worker sent no heartbeat for {grace} s (killed, or its "
                 f"machine lost); " + ("it is queued again with the same parameters" if again else
                                       f"it was a retry already ({STALE_RETRIES} at most): it is not queued again"))
            retry(study, trial)

    return stale


def _budget_rank(study, trial) -> int:
    """How many live (running, waiting or complete) trials were created before this one."""
    from optuna.trial import TrialState

    live = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.WAITING))
    return sum(1 for t in live if t.number < trial.number)


def _wait_for_a_slot(study, search: Search, worker: int) -> bool:
    """Wait until this worker may start a trial (True), or until the budget is spent: `trials` complete (False).

    A new trial ranks after every live (running, waiting or complete) trial, so it is only worth asking for
    while fewer than `trials` are live, or when a trial is waiting (a retry, which the next ask takes). When
    `trials` are live and fewer are complete, the running ones are either being evaluated or their worker is
    dead; so this worker fails the stale ones (no heartbeat for 2 x search.heartbeat s: this frees a slot)
    and looks again, until a slot frees up or all are complete. Stopping here instead would end the study
    short of its budget when the trial waited for is a dead worker's.
    """
    import optuna
    from optuna.trial import TrialState

    poll_s, grace = min(search.heartbeat / 2, WAIT_POLL_MAX_S), 2 * search.heartbeat
    started, told = time.monotonic(), False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        live = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE))
        complete = sum(1 for t in live if t.state == TrialState.COMPLETE)
        if complete >= search.trials:
            return False
        if len(live) < search.trials or any(t.state == TrialState.WAITING for t in live):
            return True
        if not told and time.monotonic() - started > 2 * grace:  # longer than a dead worker's trial lasts
            running = [t.number for t in live if t.state == TrialState.RUNNING]
            note(f"optuna worker {worker}: the study's last trials ({', '.join(map(str, running))}) are still "
                 f"running after {time.monotonic() - started:.0f} s; waiting for them to complete (a trial of a "
                 f"dead worker is failed after {grace} s without heartbeat; one started by a medmerge without "
                 "heartbeats never is: mark it FAIL, see docs/sweeps.md)")
            told = True
        time.sleep(poll_s)


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
        # optuna's heartbeat thread writes its first beat a moment after the trial starts, and a trial with no
        # beat is never failed as stale: a worker killed in between would leave it RUNNING for ever (the others
        # waiting on it). One beat written here, before any work, closes that window.
        trial.storage.record_heartbeat(trial._trial_id)
        if _budget_rank(study, trial) >= search.trials:  # another worker took the last slot meanwhile
            trial.set_user_attr("pruned_because", "the study's trial budget was reached")
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

            while _wait_for_a_slot(study, search, worker):
                try:  # one trial at a time: between two, the worker waits for a slot (the budget holds)
                    study.optimize(objective, n_trials=1, callbacks=[advance], catch=())
                except optuna.exceptions.UpdateFinishedTrialError as e:
                    # another worker failed this trial as stale: its heartbeats were late by more than the
                    # grace period (the machine or the database stalled). Its result is dropped; go on.
                    note(f"optuna worker {worker}: a trial was failed by another worker while it ran ({e}); its "
                         f"result is dropped. If this recurs, raise search.heartbeat (now {search.heartbeat} s)")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [t.user_attrs["row"] for t in sorted(complete, key=lambda t: t.number)]
    info = {"sampler": search.sampler, "study": search.study, "storage": _redact(storage), "trials": search.trials,
            "completed": len(complete), "worker": worker, "seed": cfg.seed + worker,
            "pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
            "failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))), "heartbeat": search.heartbeat,
            "space": search.space, "methods": search.methods, "layer_groups": search.layer_groups,
            "workers": sorted({t.user_attrs["row"].get("worker", 0) for t in complete})}
    return rows, info


def _redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)
