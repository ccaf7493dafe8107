"""Recipes' run folders: names from configs stay under OUT, and --force never removes or writes into an input."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medmerge.errors import InputError
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
