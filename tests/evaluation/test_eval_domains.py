"""`medmerge eval` settings outside their domain are clear errors before a model is loaded: --limit inf or nan,
seeds outside numpy's range, --batch-size 0, an empty stop string; and compare does not score booleans."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.cli.common import console
from medmerge.errors import InputError, MedmergeError
from medmerge.evaluation.compare import compare
from medmerge.evaluation.runner import SEED_MAX, check_limit, check_request
from medmerge.evaluation.taskfile import load_task_file
from medmerge.tiny import make_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(console, "width", 2000)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("domains") / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64)


@pytest.fixture
def task_file(tmp_path) -> Path:
    (tmp_path / "d.jsonl").write_text('{"text": "a b", "ref": "b"}\n{"text": "c", "ref": "c d"}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\nmetrics: [rouge]\n"
                    "max_new_tokens: 4\n")
    return spec


def _eval(base, task_file, tmp_path, *extra):
    result = runner.invoke(app, ["eval", str(base), "--task-file", str(task_file), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("limit", [float("inf"), float("nan"), -1, 0, True, "3"])
def test_limit_must_be_finite_and_positive(base, task_file, limit):
    with pytest.raises(MedmergeError, match=r"--limit .*: use a fraction below 1 .*finite number above 0"):
        check_request(base, [], None, task_files=[task_file], device="cpu", limit=limit)


def test_limit_counts_are_whole_and_fractions_stay_fractions(base, task_file):
    assert check_limit(2.0) == 2 and isinstance(check_limit(2.0), int) and check_limit(0.5) == 0.5
    assert check_limit(None) is None
    with pytest.raises(MedmergeError, match=r"--limit 2.5: a number of documents is a whole number; use 2 or 3"):
        check_request(base, [], None, task_files=[task_file], device="cpu", limit=2.5)
    assert check_request(base, [], None, task_files=[task_file], device="cpu", limit=2.0).limit == 2


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_cli_limit_inf_or_nan_is_exit_2(base, task_file, tmp_path, value):
    result = _eval(base, task_file, tmp_path, "--limit", value)
    assert result.exit_code == 2, result.output
    assert "--limit" in result.output and "finite number above 0" in result.output
    assert "internal error" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, True])
def test_seed_outside_numpy_range_is_refused(base, task_file, seed):
    with pytest.raises(MedmergeError, match=rf"--seed {seed!r}: use a whole number from 0 to {SEED_MAX}"):
        check_request(base, [], None, task_files=[task_file], device="cpu", seed=seed)
    assert check_request(base, [], None, task_files=[task_file], device="cpu", seed=SEED_MAX).seed == SEED_MAX


def test_cli_seed_and_batch_size_out_of_range_are_exit_2(base, task_file, tmp_path):
    result = _eval(base, task_file, tmp_path, "--seed", "-1")
    assert result.exit_code == 2 and "--seed -1: use a whole number from 0 to 4294967295" in result.output, \
        result.output
    result = _eval(base, task_file, tmp_path, "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size 0: use a positive integer" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stop", ['""', '["\\n", ""]'])
def test_empty_stop_string_is_refused(task_file, stop):
    task_file.write_text(task_file.read_text() + f"stop: {stop}\n")
    with pytest.raises(InputError, match=r"t.yaml: stop holds an empty string .*cuts every generation short"):
        load_task_file(task_file)


def test_compare_does_not_score_booleans(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"schema": "medmerge.eval/1", "tasks": {"t": {"acc": True}}}))
    with pytest.raises(InputError, match=r"results.json: tasks.t.acc is True, not a number"):
        compare([run], {})
