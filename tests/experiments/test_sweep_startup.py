"""`medmerge sweep --search optuna` workers started at the same instant all open one study (sqlite, PostgreSQL).

Every round starts N worker processes on a fresh database; they wait on one Barrier, so they all create the
storage's tables at once, while two busy loops load the CPUs. Each opens the study through medmerge's own
`open_study`, then asks for and finishes one trial. optuna's bare `create_study(storage=URL)` fails this in
most rounds ("table studies already exists", "UNIQUE constraint failed: alembic_version.version_num").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from glob import glob
from pathlib import Path

import pytest

from medmerge.errors import ConfigError
from medmerge.experiments.sweep.config import Search
from medmerge.experiments.sweep.search import check_storage, open_study

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
