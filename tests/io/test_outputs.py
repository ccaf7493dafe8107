"""Outputs never destroy inputs: OUT vs the inputs, one writer per OUT, stale temporaries, permissions, OS errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import medmerge
from medmerge.errors import InputError, OutputError, OutputExistsError
from medmerge.io import writer
from medmerge.io.paths import check_not_input, safe_name, under
from medmerge.io.writer import atomic_output_dir, output_lock, remove_stale_temporaries

CLI = [sys.executable, "-m", "medmerge.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def said(text: str) -> str:
    """The CLI's stderr with rich's line wrapping undone."""
    return " ".join(text.split())


def linear(*paths) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}


@pytest.fixture()
def two_models(llama_family, tmp_path) -> Path:
    """A folder DIR holding copies of two models (the shape of the reported data loss)."""
    folder = tmp_path / "models"
    for name in ("a", "b"):
        shutil.copytree(llama_family[name], folder / name)
    return folder


def test_check_not_input_is_contains_inside(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    for out, relation in ((model, "is"), (tmp_path, "contains"), (model / "sub", "is inside"),
                          (tmp_path / "data.jsonl", "is")):
        with pytest.raises(InputError, match=f"{relation} the input"):
            check_not_input(out, [model, tmp_path / "data.jsonl"])
    check_not_input(tmp_path / "other", [model, None, tmp_path / "data.jsonl"])
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(InputError, match="is the input"):  # through a symlink too
        check_not_input(link, [model])


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", ".", ".hidden", "-rf", "", "a\\b", "x" * 200])
def test_safe_name_refuses_what_could_leave_out(name):
    with pytest.raises(InputError, match="cannot be used as a folder name"):
        safe_name(name, "starts: the name")


def test_under_refuses_escapes_and_symlinks_out(tmp_path):
    assert under(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(InputError, match="outside"):
        under(tmp_path / "root", "..", "x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "esc").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        under(tmp_path / "root", "esc", "x")


def test_merge_force_into_the_folder_holding_its_inputs_deletes_nothing(two_models):
    cfg = linear(two_models / "a", two_models / "b")
    before = sorted(str(p.relative_to(two_models)) for p in two_models.rglob("*"))
    for out in (two_models, two_models / "a", two_models / "a" / "merged"):
        with pytest.raises(InputError, match="an output must be a separate folder"):
            medmerge.merge(cfg, out, force=True, progress=False)
    assert sorted(str(p.relative_to(two_models)) for p in two_models.rglob("*")) == before


def test_merge_cli_force_onto_inputs_is_exit_2_and_keeps_them(two_models, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(linear(two_models / "a", two_models / "b")))
    run = subprocess.run([*CLI, "merge", str(cfg), str(two_models), "--force"], capture_output=True, text=True,
                         env=ENV)
    assert run.returncode == 2 and "contains the input" in said(run.stderr) and "Traceback" not in run.stderr
    assert (two_models / "a" / "model.safetensors").is_file() and (two_models / "b" / "config.json").is_file()


def test_adapters_merge_and_eval_refuse_an_output_over_their_inputs(llama_family, tmp_path):
    from medmerge.adapters.merge import merge_adapters
    from medmerge.evaluation.runner import check_request

    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    with pytest.raises(InputError, match="is the input"):
        merge_adapters(base, [(base, 1.0)], base, force=True, progress=False)
    with pytest.raises(InputError, match="is the input"):
        check_request(base, ["ifeval"], base, force=True)
    with pytest.raises(InputError, match="is inside the input"):
        check_request(base, ["ifeval"], base / "eval", force=True)
    assert (base / "model.safetensors").is_file()


def test_output_folder_gets_the_users_permissions(llama_family, tmp_path):
    old = os.umask(0o022)
    try:
        out = medmerge.merge(linear(llama_family["a"], llama_family["b"]), tmp_path / "m", progress=False).out
    finally:
        os.umask(old)
    assert (Path(out).stat().st_mode & 0o777) == 0o755


def test_a_temporary_folder_left_by_a_killed_run_is_removed_next_time(llama_family, tmp_path, capsys):
    out = tmp_path / "m"
    script = ("import sys, time; from pathlib import Path; from medmerge.io.writer import atomic_output_dir\n"
              "with atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
              "    (tmp / 'part.safetensors').write_bytes(b'x' * 1000); print(tmp, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    left = Path(child.stdout.readline().strip())
    assert left.is_dir()
    child.send_signal(signal.SIGKILL)  # no clean-up can run
    child.wait()
    assert left.is_dir()
    medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, progress=False)
    assert not left.exists() and (out / "model.safetensors").is_file()
    assert f"removed {left}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")] == []


def test_a_temporary_folder_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "m"
    mine = tmp_path / f".m.medmerge-tmp-{os.getppid()}-abc"  # the parent (pytest's launcher) is alive
    mine.mkdir()
    with output_lock(out):
        assert remove_stale_temporaries(out) == [] and mine.is_dir()


def _hold_lock(out: Path) -> subprocess.Popen:
    script = ("import sys, time; from pathlib import Path; from medmerge.io.writer import output_lock\n"
              "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_of_the_same_output_is_refused_at_once(llama_family, tmp_path):
    out = tmp_path / "m"
    holder = _hold_lock(out)
    try:
        with pytest.raises(OutputExistsError, match=rf"another medmerge process \(pid {holder.pid}\) is writing"):
            medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, force=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, progress=False)  # the lock went with it


@pytest.mark.slow  # starts merge processes
def test_two_merges_started_together_never_both_succeed(llama_family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(linear(llama_family["a"], llama_family["b"])))
    # each waits for the same instant (after its imports) before merging
    starter = ("import sys, time, runpy; t = float(sys.argv.pop(1));\n"
               "import medmerge.cli.app, medmerge.merging\n"
               "time.sleep(max(0, t - time.time())); sys.argv[0] = 'medmerge'; runpy.run_module('medmerge.cli', "
               "run_name='__main__')\n")
    for round_ in range(3):
        out = tmp_path / f"m{round_}"
        at = time.time() + 12
        procs = [subprocess.Popen([sys.executable, "-c", starter, str(at), "merge", str(cfg), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = said(next(err for code, err in results if code == 2))
        assert ("is writing" in loser or "exists and is not empty" in loser) and "Traceback" not in loser
        assert (out / "model.safetensors").is_file()


def test_disk_full_is_refused_before_writing_and_named(llama_family, tmp_path, monkeypatch):
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    out = tmp_path / "m"
    with pytest.raises(OutputError, match=r"not enough space for .*m: it needs [0-9,]+ bytes and .* has 10 free"):
        medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied"), (errno.ELOOP, "the path is a symbolic link loop")])
def test_os_errors_while_writing_name_the_path_and_remedy(llama_family, tmp_path, monkeypatch, code, words):
    def fail(self, data):
        raise OSError(code, os.strerror(code), str(self.folder / "model.safetensors"))

    monkeypatch.setattr(writer.ShardedWriter, "write", fail)
    out = tmp_path / "m"
    with pytest.raises(OutputError, match=f"cannot use {out}/model.safetensors: {words}"):
        medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, progress=False)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".m.")] == []


def test_cli_output_under_a_symlink_loop_or_a_file_is_a_clear_error(llama_family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(linear(llama_family["a"], llama_family["b"])))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "loop" / "m", tmp_path / "file" / "m"):
        run = subprocess.run([*CLI, "merge", str(cfg), str(out)], capture_output=True, text=True, env=ENV)
        assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_atomic_output_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        with atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert (out / "theirs").read_text() == "theirs"


def test_report_force_replaces_only_medmerge_reports(tmp_path):
    from medmerge.experiments.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "decoding.json").write_text(json.dumps({"settings": [], "model": "m", "tasks": []}))
    (run / "report.md").write_text("my own notes\n")
    with pytest.raises(OutputExistsError, match="report.md was not written by medmerge report"):
        write_report(run, force=True)
    assert (run / "report.md").read_text() == "my own notes\n"
    (run / "report.md").unlink()
    write_report(run)
    write_report(run, force=True)  # its own report it replaces
    assert (run / "report.md").stat().st_mode & 0o777 == 0o666 & ~writer.current_umask()


def test_an_output_that_is_a_symlink_is_refused(llama_family, tmp_path):
    """M39: OUT a symlink to an (empty) folder: the link was replaced by a real folder, the target left empty."""
    target = tmp_path / "real_out"
    target.mkdir()
    link = tmp_path / "out_link"
    link.symlink_to(target)
    for force in (False, True):
        with pytest.raises(OutputError, match=r"out_link is a symbolic link \(to .*real_out\).* pass .*real_out"):
            medmerge.merge(linear(llama_family["a"], llama_family["b"]), link, force=force, progress=False)
        with pytest.raises(OutputError, match=r"is a symbolic link"):
            with atomic_output_dir(link, force=force):
                pass
    assert link.is_symlink() and list(target.iterdir()) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match=r"is a symbolic link"):
        medmerge.merge(linear(llama_family["a"], llama_family["b"]), dangling, progress=False)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_atomic_output_dir_expands_a_tilde(tmp_path, monkeypatch):
    """M19: '~/x' is the user's home, as for the inputs, not a folder named '~' in the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with atomic_output_dir(Path("~/x")) as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "home" / "x" / "f").read_text() == "1" and not (tmp_path / "~").exists()


def test_an_output_name_too_long_for_the_file_system_is_named(llama_family, tmp_path):
    """M17: a 300-character OUT name (ENAMETOOLONG) is an error naming it, not a traceback."""
    out = tmp_path / ("x" * 300)
    with pytest.raises((OutputError, InputError), match=r"the name is too long for the file system"):
        medmerge.merge(linear(llama_family["a"], llama_family["b"]), out, progress=False)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".x")] == []
