"""Recipes' run folders: names from configs stay under OUT, and --force never removes or writes into an input."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medmerge.errors import ConfigError, InputError
from medmerge.experiments.config import config_inputs
from medmerge.experiments.fewshot import run as run_fewshot
from medmerge.experiments.rundir import open_run_dir
from medmerge.experiments.sweep.run import run as run_sweep


def _fewshot_config(path: Path, starts: dict, data: Path) -> Path:
    cfg = {"starts": starts, "data": {"path": str(data)}, "k": [2], "claim": None,
           "training": {"max_steps": 1, "batch_size": 2, "threads": 1, "device": "cpu"},
           "eval": {"tasks": ["ifeval"], "limit": 1, "device": "cpu"},
           "scores": {"if_metric": "ifeval/prompt_level_strict_acc", "clinical_metrics": []}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "ft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in ("a", "b", "c")))
    return path


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", "/tmp/evil"])
def test_a_fewshot_start_name_never_becomes_a_path_outside_out(llama_family, tmp_path, data, name):
    victim = tmp_path.parent / "x"  # where `starts/../../../x` pointed
    cfg = _fewshot_config(tmp_path / "f.yml", {name: {"merge": {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 1.0}}]}}}, data)
    with pytest.raises(InputError, match="cannot be used as a folder name"):
        run_fewshot(cfg, tmp_path / "run", progress=False)
    assert not victim.exists() and not (tmp_path / "run" / "starts").exists()


def test_a_run_folder_inside_an_input_model_is_refused(llama_family, tmp_path, data):
    model = tmp_path / "model"
    shutil.copytree(llama_family["a"], model)
    cfg = _fewshot_config(tmp_path / "f.yml", {"a": str(model)}, data)
    with pytest.raises(InputError, match="is inside the input"):
        run_fewshot(cfg, model / "run", force=True, progress=False)
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in llama_family["a"].iterdir())


def test_force_never_removes_an_input_kept_in_a_stale_folder(llama_family, tmp_path, data):
    out = tmp_path / "run"
    kept = out / "runs" / "my-model"  # e.g. a model an earlier run trained, now used as a start
    shutil.copytree(llama_family["a"], kept)
    cfg = _fewshot_config(tmp_path / "f.yml", {"a": str(kept)}, data)
    with pytest.raises(InputError, match=r"lies in .*runs, which this few-shot run replaces"):
        run_fewshot(cfg, out, force=True, progress=False)
    assert (kept / "model.safetensors").is_file()


def test_config_inputs_are_the_paths_it_names(llama_family, tmp_path, data):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"models": {"a": str(llama_family["a"]), "b": "${world}/b"},
                                   "data": {"path": data.name}, "tasks": ["ifeval"], "note": "no such path"}))
    assert set(config_inputs(cfg)) == {cfg, llama_family["a"], tmp_path / data.name}
    assert open_run_dir(tmp_path / "run", True, inputs=config_inputs(cfg)).is_dir()


def test_sweep_export_best_over_the_run_or_an_input_is_refused_before_any_work(llama_family, tmp_path):
    model = tmp_path / "instruct"
    shutil.copytree(llama_family["a"], model)
    cfg = tmp_path / "sweep.yml"
    cfg.write_text(yaml.safe_dump({"models": {"instruct": str(model)}}))
    for target, words in ((model, "is the input"), (tmp_path / "run", "is the input"),
                          (tmp_path / "run" / "best", "is inside the input"), (tmp_path, "contains the input")):
        with pytest.raises(InputError, match=words):
            run_sweep(cfg, tmp_path / "run", export_best=target, export_force=True, progress=False)
    assert (model / "model.safetensors").is_file() and not (tmp_path / "run").exists()


# --- a run that is refused deletes nothing; the config kept in OUT is never written over ------------------------


class _Stop(Exception):
    """Raised where a recipe's first step would start: everything before it (checks, clearing, records) ran."""


def _stop(*args, **kwargs):
    raise _Stop


def _sweep_config(path: Path, family: dict, **changes) -> Path:
    cfg = {"models": {"base": str(family["base"]), "clinical": str(family["a"]), "instruct": str(family["b"])},
           "references": ["instruct", "clinical"], "grid": [{"method": "linear", "t": [0.0, 1.0]}],
           "eval": {"tasks": ["mm_pubmedqa"]}, "device": "cpu", **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_stage_config(path: Path, family: dict, data: Path, **changes) -> Path:
    stage = {"max_seq_length": 32, "training": {"max_steps": 1, "batch_size": 2, "threads": 1, "device": "cpu"}}
    cfg = {"base": str(family["base"]), "pt": {"data": {"path": str(data)}, **stage},
           "sft": {"data": {"path": str(data)}, **stage}, "merge": {"w_pt": [0.5]},
           "eval": {"tasks": ["mm_pubmedqa"], "device": "cpu"}, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _medcare_config(path: Path, family: dict, data: Path, **changes) -> Path:
    cfg = {"model": str(family["base"]), "knowledge": [{"path": str(data)}], "alignment": [{"path": str(data)}],
           "eval": {"tasks": ["mm_pubmedqa"], "device": "cpu"}, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _recipes():
    from medmerge.experiments import medcare_vs_lora, two_stage_lora

    return {"pipeline": (two_stage_lora.run, "results.md", ("results.json",)),
            "medcare": (medcare_vs_lora.run, "results.md", ("results.json",)),
            "fewshot": (run_fewshot, "fewshot.md", ("fewshot.json",)),
            "sweep": (run_sweep, "sweep.md", ())}


@pytest.mark.parametrize("recipe", ["pipeline", "medcare", "fewshot", "sweep"])
@pytest.mark.parametrize("force", [False, True])
def test_a_missing_config_deletes_nothing_in_out(tmp_path, recipe, force):
    run, results_md, _ = _recipes()[recipe]
    out = tmp_path / "RUN"
    (out / "cache").mkdir(parents=True)
    (out / "runs").mkdir()
    (out / results_md).write_text("the results of an earlier run\n")
    with pytest.raises(ConfigError, match=r"missing.yml does not exist"):
        run(tmp_path / "missing.yml", out, force=force, progress=False)
    assert (out / results_md).read_text() == "the results of an earlier run\n"
    assert (out / "cache").is_dir() and (out / "runs").is_dir()


@pytest.mark.parametrize("recipe", ["pipeline", "medcare", "fewshot", "sweep"])
def test_an_invalid_config_deletes_nothing_even_with_force(llama_family, tmp_path, data, recipe):
    run, results_md, _ = _recipes()[recipe]
    out = tmp_path / "RUN"
    for stale in ("cache", "starts", "runs", "eval"):
        (out / stale).mkdir(parents=True)
    (out / results_md).write_text("kept\n")
    config = tmp_path / "c.yml"
    config.write_text("models: [unclosed\n")  # not YAML
    with pytest.raises(ConfigError, match="not valid YAML"):
        run(config, out, force=True, progress=False)
    write = {"pipeline": _two_stage_config, "medcare": _medcare_config, "sweep": _sweep_config,
             "fewshot": lambda p, fam, d, **kw: _fewshot_config(p, {"a": str(fam["a"])}, d)}[recipe]
    config = write(tmp_path / "c.yml", llama_family, data) if recipe != "sweep" else write(tmp_path / "c.yml",
                                                                                          llama_family)
    with pytest.raises(ConfigError):
        run(config, out, overrides=["seed=-1"], force=True, progress=False)  # parses, but the seed is refused
    assert (out / results_md).read_text() == "kept\n"
    assert all((out / stale).is_dir() for stale in ("cache", "starts", "runs", "eval"))


@pytest.mark.parametrize("recipe, name, first_step", [
    ("sweep", "sweep", "medmerge.experiments.sweep.run.open_evaluator"),
    ("fewshot", "fewshot", "medmerge.experiments.fewshot.resolve_start"),
    ("pipeline", "pipeline", "medmerge.experiments.two_stage_lora._train_stage"),
    ("medcare", "experiment", "medmerge.experiments.medcare_vs_lora._train_medcare"),
])
def test_a_config_kept_in_the_run_folder_is_never_written_over(llama_family, tmp_path, data, monkeypatch, recipe,
                                                               name, first_step):
    run, results_md, _ = _recipes()[recipe]
    monkeypatch.setattr(first_step, _stop)
    out = tmp_path / "RUN"
    config = out / f"{name}.yml"  # the user's config, kept in the run folder
    if recipe == "sweep":
        _sweep_config(config, llama_family)
    elif recipe == "fewshot":
        out.mkdir()
        _fewshot_config(config, {"a": str(llama_family["a"])}, data)
    elif recipe == "pipeline":
        _two_stage_config(config, llama_family, data)
    else:
        _medcare_config(config, llama_family, data)
    mine = config.read_bytes()
    (out / results_md).write_text("stale\n")
    with pytest.raises(_Stop):
        run(config, out, progress=False)
    assert config.read_bytes() == mine  # the user's file, byte for byte
    assert yaml.safe_load((out / f"{name}.resolved.yml").read_text())  # the config as run, beside it
    if recipe != "sweep":
        assert not (out / results_md).exists()  # cleared right before the first step: nothing looks current
    # a config named like the record itself is refused before anything is written
    record = out / f"{name}.resolved.yml"
    record.write_bytes(mine)
    with pytest.raises(InputError, match=rf"the input .*{name}.resolved.yml lies in .*, which this .* replaces"):
        run(record, out, progress=False)
    assert record.read_bytes() == mine


def test_sweep_trials_must_be_at_least_one_before_any_work(llama_family, tmp_path):
    cfg = _sweep_config(tmp_path / "s.yml", llama_family, grid=[])
    for trials in (0, -3, True):
        with pytest.raises(ConfigError, match=rf"--trials {trials!r}: use a whole number of trials >= 1"):
            run_sweep(cfg, tmp_path / "run", search="optuna", trials=trials, progress=False)
    with pytest.raises(ConfigError, match="--search must be optuna"):
        run_sweep(cfg, tmp_path / "run", search="bayes", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, match", [
    ({"seed": -1}, r"seed: Input should be greater than or equal to 0"),
    ({"seed": 2**32}, r"seed: Input should be less than or equal to 4294967295"),
    ({"eval": {"tasks": ["mm_pubmedqa"], "limit": float("inf")}}, r"eval.limit: Input should be a finite number"),
    ({"eval": {"tasks": ["mm_pubmedqa"], "batch_size": 0}}, r"eval.batch_size: Input should be greater than or equal"),
    ({"dtype": "float99"}, r"'float99' is not one of float32"),
    ({"grid": [], "search": {"methods": ["linear"], "space": {"t": [0, float("inf")]}}}, r"inf is outside \[0, 1\]"),
])
def test_sweep_settings_outside_their_domain_are_config_errors(llama_family, tmp_path, changes, match):
    cfg = _sweep_config(tmp_path / "s.yml", llama_family, **changes)
    with pytest.raises(ConfigError, match=match):
        run_sweep(cfg, tmp_path / "run", search="optuna" if "search" in changes else None, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("record, match", [
    ("decoding.json", r"decoding.json: not a complete record for the report \(it has no key 'settings'\)"),
    ("sweep_summary.json", r"sweep_summary.json \(or a row of its sweep.jsonl\): not a complete record for the "
                           r"report \(it has no key 'if_metric'\)"),
    ("fewshot.json", r"fewshot.json: not a complete record for the report \(it has no key 'starts'\)"),
    ("demo.json", r"demo.json: not a complete record for the report \(it has no key 'forgetting'\)"),
])
def test_report_on_an_incomplete_record_names_the_file_and_key(tmp_path, record, match):
    from medmerge.experiments.report import write_report

    (tmp_path / "part").mkdir()
    target = tmp_path / ("part" if record != "demo.json" else ".") / record
    target.write_text("{}")
    with pytest.raises(InputError, match=match):
        write_report(tmp_path)
    target.write_text("[1, 2]")
    with pytest.raises(InputError, match=rf"{record}: expected a JSON object"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report.md").exists()


def test_report_names_a_damaged_sweep_log_line(tmp_path):
    from medmerge.experiments.report import write_report

    (tmp_path / "sweep_summary.json").write_text("{}")
    (tmp_path / "sweep.jsonl").write_text('{"kind": "reference"}\n{"kind": \n')
    with pytest.raises(InputError, match=r"sweep.jsonl, line 2: not valid JSON"):
        write_report(tmp_path)
