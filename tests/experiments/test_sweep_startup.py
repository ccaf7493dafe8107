"""`medmerge sweep --search optuna` workers started at the same instant all open one study (sqlite, PostgreSQL).

Every round starts N worker processes on a fresh database; they wait on one Barrier, so they all create the
storage's tables at once, while two busy loops load the CPUs. Each opens the study through medmerge's own
`open_study`, then asks for and finishes one trial. optuna's bare `create_study(storage=URL)` fails this in
most rounds ("table studies already exists", "UNIQUE constraint failed: alembic_version.version_num").

Then the search itself: four workers started at once run the real `run_search` on one study (sqlite, then
PostgreSQL) with a stand-in evaluator (no model: a score computed from the point, 0.3-1 s per trial) and
complete exactly the budget, with no duplicate; a worker killed in the middle of a trial costs its trial
(failed after the heartbeat's grace period, queued once more) but not the budget.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from glob import glob
from pathlib import Path

import pytest

from medmerge.errors import ConfigError
from medmerge.experiments.sweep.config import Search, SweepConfig
from medmerge.experiments.sweep.outputs import SweepLog
from medmerge.experiments.sweep.points import Roles
from medmerge.experiments.sweep.search import check_storage, open_study, run_search

pytestmark = pytest.mark.slow  # starts child processes (and, where it can, a PostgreSQL server)

CTX = mp.get_context("fork")  # the children inherit the imports: they start in milliseconds, all together
STUDY = "startup-race"
# (workers, rounds): every round starts that many workers at once on a fresh database. optuna's bare
# create_study fails every one of these rounds on sqlite (the worker processes are forked warm: they race
# within milliseconds); the numbers keep the file under a minute on 2 loaded cores.
SQLITE_ROUNDS = [(2, 10), (6, 6)]
POSTGRES_ROUNDS = 4


def _open(url: str, out: str, worker: int):
    return open_study(Search(sampler="random", study=STUDY, storage=url), Path(out), 0, worker)[0]


def _worker(url: str, out: str, worker: int, barrier, results) -> None:
    try:
        barrier.wait(timeout=60)
        study = _open(url, out, worker)
        trial = study.ask()
        study.tell(trial, [float(worker), 1.0])
        results.put((worker, "ok", study._study_id))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((worker, "failed", f"{type(e).__name__}: {e}"))


def _round(url: str, out: Path, n: int) -> list[str]:
    """Start n workers at once on `url`; return the failures (empty when every worker opened one study)."""
    barrier, results = CTX.Barrier(n), CTX.Queue()
    procs = [CTX.Process(target=_worker, args=(url, str(out), k, barrier, results)) for k in range(n)]
    for p in procs:
        p.start()
    got = []
    try:
        got = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [f"worker {k}: {what}" for k, state, what in got if state != "ok"]
    if not failures:
        ids = {what for _, _, what in got}
        names, complete = _stored(url)
        if len(ids) != 1 or names != [STUDY]:
            failures.append(f"the workers saw studies {ids}; the storage holds {names}")
        elif complete != n:
            failures.append(f"{complete} finished trials, not one per worker ({n})")
    return failures


def _stored(url: str) -> tuple[list[str], int]:
    """The storage's study names and finished trials, read with plain SQL (cheap: no optuna storage)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            names = [row[0] for row in conn.execute(sqlalchemy.text("SELECT study_name FROM studies"))]
            complete = conn.execute(sqlalchemy.text("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")).scalar()
    finally:
        engine.dispose()
    return names, complete


def _spin() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        pass


@pytest.fixture(scope="module")
def cpu_load(tmp_path_factory):
    """Two busy loops: the workers start (and race) on loaded CPUs, as beside a running evaluation.

    A study is opened here first: the forked workers inherit what the first opening imports and builds
    (alembic's migration scripts, SQLAlchemy's table events: seconds under load), so each round is quick.
    """
    warm = tmp_path_factory.mktemp("warm")
    _open(f"sqlite:///{warm / 'study.db'}", str(warm), 0)
    burners = [CTX.Process(target=_spin, daemon=True) for _ in range(2)]
    for b in burners:
        b.start()
    yield
    for b in burners:
        b.terminate()
        b.join()


@pytest.mark.parametrize("workers, rounds", SQLITE_ROUNDS)
def test_workers_started_together_share_one_sqlite_study(cpu_load, tmp_path, workers, rounds):
    failed = {}
    for r in range(rounds):
        out = tmp_path / f"round{r}"
        out.mkdir()
        failures = _round(f"sqlite:///{out / 'study.db'}", out, workers)
        if failures:
            failed[r] = failures
    assert not failed, f"{len(failed)}/{rounds} rounds failed: {failed}"


def _postgres_bin(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@contextmanager
def throwaway_postgres():
    """A PostgreSQL cluster in a temporary folder (trust auth, a unix socket there, no TCP); yields a function
    that creates a fresh database and returns its URL. Skips when PostgreSQL or its driver is not installed."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (as root: apt-get install -y postgresql)")
    try:
        import psycopg
    except ImportError:
        pytest.skip("the PostgreSQL driver psycopg is not installed (pip install 'psycopg[binary]')")
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres (or nobody) user
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root, and there is no postgres or nobody user (or no runuser) to run "
                        "PostgreSQL as")
        as_user = ["runuser", "-u", user, "--"]
    root = Path(tempfile.mkdtemp(prefix="medmerge-pg-"))  # in /tmp: a unix socket's path is ~100 characters at most
    data, log = root / "data", root / "log"
    if as_user:
        os.chown(root, pwd.getpwnam(as_user[2]).pw_uid, -1)
    try:
        try:
            subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                      "--no-sync"], check=True, capture_output=True, timeout=120)
            subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                                      f"-k {root} -c listen_addresses='' -c fsync=off", "start"],
                           check=True, capture_output=True, timeout=120)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            detail = (getattr(e, "stderr", None) or b"").decode(errors="replace")[-2000:]
            pytest.fail(f"could not start a throwaway PostgreSQL ({e}): {detail} "
                        f"{log.read_text()[-2000:] if log.exists() else ''}")

        def fresh_database(name: str) -> str:
            with psycopg.connect(f"host={root} user=postgres dbname=postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://postgres@/{name}?host={root}"

        yield fresh_database
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False,
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with throwaway_postgres() as fresh_database:
        _open(fresh_database("warm"), str(tmp_path_factory.mktemp("warm-pg")), 0)  # the driver's imports too
        yield fresh_database


def test_workers_started_together_share_one_postgresql_study(cpu_load, postgres, tmp_path):
    workers, rounds, failed = 6, POSTGRES_ROUNDS, {}
    for r in range(rounds):
        failures = _round(postgres(f"round{r}"), tmp_path, workers)
        if failures:
            failed[r] = failures
    assert not failed, f"{len(failed)}/{rounds} rounds failed: {failed}"


# --- the search: workers share one study, complete exactly the budget, and survive one of them dying -------------

BUDGET, WORKERS, KILLED = 12, 4, 1  # worker KILLED is SIGKILLed in its second trial (the kill test)
KILL_HEARTBEAT = 2  # seconds: the killed worker's trial is failed after 2 x 2 s without heartbeat
_databases = itertools.count()


class FakeSweep:
    """`run_search`'s evaluator and scorer with no model: a trial sleeps 0.3-1 s (so the workers' trials overlap)
    and scores the point by formula. With `stall`, the second trial sets it and sleeps until it is killed."""

    roles = Roles()

    def __init__(self, stall=None):
        self.stall, self.calls = stall, 0

    def score(self, point, sel):
        self.calls += 1
        if self.stall is not None and self.calls == 2:
            self.stall.set()
            time.sleep(600)
        time.sleep(0.3 + 0.7 * point.params["t"])
        return point

    def row(self, point, kind: str) -> dict:
        t, density = point.params["t"], point.params["density"]
        return {"kind": kind, "method": point.method, "params": point.params, "tasks": {},
                "if_score": round(100 * (1 - t), 6), "clinical_score": round(100 * t * density, 6)}


def _search_config(url: str, heartbeat: int) -> SweepConfig:
    return SweepConfig(models={"base": "base", "clinical": "clinical", "instruct": "instruct"},
                       eval={"tasks": ["none: the evaluator is a stand-in"]},
                       search=Search(sampler="random", trials=BUDGET, methods=["ties"],
                                     space={"t": [0.0, 1.0], "density": [0.3, 1.0]}, study="shared",
                                     storage=url, heartbeat=heartbeat))


def _search_worker(url: str, out: str, worker: int, heartbeat: int, barrier, results, stall) -> None:
    try:
        cfg, fake = _search_config(url, heartbeat), FakeSweep(stall)
        log = SweepLog(Path(out) / f"sweep{worker}.jsonl")  # appended row by row: it outlives a killed worker
        barrier.wait(timeout=60)
        rows, info = run_search(cfg, fake, fake, Path(out), None, log, worker=worker, progress=False)
        results.put((worker, "ok", [r["trial"] for r in rows]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((worker, "failed", f"{type(e).__name__}: {e}"))


def _run_workers(url: str, out: Path, heartbeat: int, kill: bool) -> tuple[dict, float]:
    """Start WORKERS search workers at once; with `kill`, SIGKILL worker KILLED in its second trial. Returns what
    each surviving worker reported (its exit code checked) and the wall time."""
    barrier, results, stall = CTX.Barrier(WORKERS), CTX.Queue(), CTX.Event()
    procs = [CTX.Process(target=_search_worker, args=(url, str(out), k, heartbeat, barrier, results,
                                                       stall if kill and k == KILLED else None))
             for k in range(WORKERS)]
    started = time.monotonic()
    for p in procs:
        p.start()
    try:
        if kill:
            assert stall.wait(timeout=90), f"worker {KILLED} never reached its second trial"
            os.kill(procs[KILLED].pid, signal.SIGKILL)
        got = dict((w, (state, what)) for w, state, what in (results.get(timeout=120)
                                                              for _ in range(WORKERS - kill)))
        for p in procs:
            p.join(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    survivors = [k for k in range(WORKERS) if not (kill and k == KILLED)]
    assert [procs[k].exitcode for k in survivors] == [0] * len(survivors), got
    if kill:
        assert procs[KILLED].exitcode == -signal.SIGKILL
    return got, elapsed


def _trials(url: str) -> list:
    import optuna

    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
    try:
        return optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _check_study(url: str, out: Path, got: dict, elapsed: float, what: str) -> dict:
    """The checks both tests share; returns the study's trials by state (and prints the counts)."""
    from optuna.trial import TrialState

    trials = _trials(url)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = by_state[TrialState.COMPLETE]
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    print(f"\n{what}: {len(trials)} trials: {len(complete)} complete, {len(by_state[TrialState.FAIL])} failed, "
          f"{len(by_state[TrialState.PRUNED])} pruned, {len(by_state[TrialState.WAITING])} waiting, "
          f"{len(by_state[TrialState.RUNNING])} running, {len(retried)} retries "
          f"({[(t.number, t.system_attrs['failed_trial'], t.state.name) for t in retried]}); {elapsed:.1f} s")
    assert {w: state for w, (state, _) in got.items()} == {w: "ok" for w in got}, got
    assert len(complete) == BUDGET
    assert len({t.number for t in trials}) == len(trials)  # unique trial numbers
    assert not by_state[TrialState.RUNNING]
    assert len({_point(t) for t in complete}) == BUDGET  # no point evaluated twice
    assert all(t.user_attrs.get("pruned_because") for t in by_state[TrialState.PRUNED])  # only the budget prunes
    numbers = sorted(t.number for t in complete)
    assert all(trials_seen == numbers for _, trials_seen in got.values())  # each worker returned every row
    logged = {}
    for log in out.glob("sweep*.jsonl"):
        logged.update((row["trial"], row) for row in map(json.loads, log.read_text().splitlines()))
    for t in complete:
        assert logged[t.number] == json.loads(json.dumps(t.user_attrs["row"]))  # each complete trial's row
        assert t.values == [t.user_attrs["row"]["if_score"], t.user_attrs["row"]["clinical_score"]]
    return by_state


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> None:
    """A study opened once here: the forked workers inherit what the first opening imports and builds."""
    warm = tmp_path_factory.mktemp("warm-search")
    _open(f"sqlite:///{warm / 'study.db'}", str(warm), 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_study(request, tmp_path, warm) -> str:
    """The URL of an empty storage: a sqlite file, or a fresh database on the throwaway PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres")(f"search{next(_databases)}")


def test_four_workers_started_together_complete_exactly_the_budget(shared_study, tmp_path):
    from optuna.trial import TrialState

    got, elapsed = _run_workers(shared_study, tmp_path, heartbeat=60, kill=False)
    by_state = _check_study(shared_study, tmp_path, got, elapsed, f"{shared_study.split(':')[0]}, 4 workers")
    assert not by_state[TrialState.FAIL] and set(got) == set(range(WORKERS))


def test_a_worker_killed_mid_trial_costs_its_trial_not_the_budget(shared_study, tmp_path):
    from optuna.trial import TrialState

    got, elapsed = _run_workers(shared_study, tmp_path, heartbeat=KILL_HEARTBEAT, kill=True)
    by_state = _check_study(shared_study, tmp_path, got, elapsed,
                            f"{shared_study.split(':')[0]}, 4 workers, worker {KILLED} killed")
    [killed] = by_state[TrialState.FAIL]  # the killed worker's trial, failed for want of heartbeats
    assert "row" not in killed.user_attrs  # it was killed while being evaluated
    assert sorted(got) == [k for k in range(WORKERS) if k != KILLED]
    [retry] = [t for t in _trials(shared_study) if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params  # queued again with the same point ...
    # ... and evaluated, unless another worker took the slot the failure freed before the retry was queued
    # (then the retry ranks past the budget and is pruned): either way the budget holds
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    evaluated = Counter(_point(t) for t in by_state[TrialState.COMPLETE] + by_state[TrialState.FAIL])
    twice = [point for point, n in evaluated.items() if n > 1]
    assert twice == ([_point(killed)] if retry.state == TrialState.COMPLETE else [])  # the retry, only


def _point(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


@pytest.mark.parametrize("heartbeat", [0, -5, 1.5, 7200, "often"])
def test_a_bad_heartbeat_is_refused(heartbeat):
    from pydantic import ValidationError

    assert Search().heartbeat == 60 and Search(heartbeat=2).heartbeat == 2
    with pytest.raises(ValidationError, match="heartbeat"):
        Search(heartbeat=heartbeat)


def test_a_bad_storage_is_refused_with_what_to_do(tmp_path, monkeypatch):
    check_storage(None)
    check_storage(f"sqlite:///{tmp_path / 'study.db'}")
    for url, message in [("mysql://u:pw@host/db", "'mysql' databases are not supported"),
                         ("not a url", "is not a database URL"),
                         (f"sqlite:///{tmp_path / 'missing' / 'study.db'}", "the folder .*missing does not exist"),
                         ("sqlite://", "through a file"),
                         ("postgresql+nodriver://u@host/db", "unknown postgresql driver 'nodriver'")]:
        with pytest.raises(ConfigError, match=message):
            check_storage(url)
    with pytest.raises(ConfigError) as e:
        check_storage("mysql://user:secret@host/db")
    assert "secret" not in str(e.value)  # the password is not echoed
    for driver, install in [("psycopg", "pip install 'psycopg\\[binary\\]'"), ("psycopg2", "psycopg2-binary")]:
        monkeypatch.setitem(sys.modules, driver, None)  # as if it were not installed
        with pytest.raises(ConfigError, match=f"driver '{driver}' is not installed .*{install}"):
            check_storage(f"postgresql+{driver}://u@host/db")


def test_a_bad_storage_stops_the_sweep_before_the_references_are_evaluated(sweep_family, tmp_path, monkeypatch):
    from medmerge.evaluation import runner
    from medmerge.experiments.sweep.run import run

    calls = []
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: calls.append(a))
    with pytest.raises(ConfigError, match="the folder .*nowhere does not exist"):
        run(sweep_family / "sweep.yaml", tmp_path / "run", search="optuna", trials=2,
            storage=f"sqlite:///{tmp_path / 'nowhere' / 'study.db'}", progress=False)
    assert calls == [] and not (tmp_path / "nowhere").exists()


def test_a_stale_trial_failed_by_two_workers_is_retried_once(tmp_path):
    """On sqlite two workers can both fail one stale trial (optuna's check-and-set lets both through), and each
    then runs the stale-trial callback: it queues the retry under the storage's lock, once."""
    import optuna
    from optuna.trial import TrialState

    from medmerge.experiments.sweep.search import _retry_stale

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, directions=["maximize", "maximize"])
    trial = study.ask({"t": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, state=TrialState.FAIL)
    failed = study.get_trials(deepcopy=True)[0]
    callback = _retry_stale(4, url)
    callback(study, failed)
    callback(study, failed)  # the second worker
    retries = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING and retries[0].params == failed.params


def test_a_trial_has_a_heartbeat_before_its_evaluation_starts(tmp_path, monkeypatch):
    """optuna never fails a RUNNING trial that has no heartbeat yet, and its heartbeat thread writes the first one
    a moment after the trial starts: a worker killed in between would leave the trial running for ever. With the
    thread silenced here, the beat medmerge writes itself must already be there when the evaluation starts."""
    import sqlite3

    import optuna.study._optimize as optimize_module
    from optuna.storages._heartbeat import NullHeartbeatThread

    from medmerge.experiments.sweep.search import run_search

    monkeypatch.setattr(optimize_module, "get_heartbeat_thread", lambda *a, **k: NullHeartbeatThread())
    db = tmp_path / "study.db"
    beats = []

    class Checked(FakeSweep):
        def score(self, point, sel):
            with sqlite3.connect(db) as conn:
                beats.append(conn.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0])
            return super().score(point, sel)

    cfg = _search_config(f"sqlite:///{db}", 60)
    cfg.search.trials = 2
    fake = Checked()
    rows, info = run_search(cfg, fake, fake, tmp_path, None, SweepLog(tmp_path / "sweep.jsonl"), progress=False)
    assert info["completed"] == 2 and beats == [1, 2]
