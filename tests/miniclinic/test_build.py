"""The quick synthetic world builds end to end with `medmerge train`; its models load, generate and merge."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.miniclinic.build import MODELS


@pytest.fixture(scope="module")
def built(quick_world) -> tuple[Path, Path]:
    return quick_world


def test_quick_world_summary_and_models(built):
    root, _ = built
    out = root / "world"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "quick" and set(summary["scores"]) == set(MODELS)
    for scores in summary["scores"].values():
        assert set(scores) == {"if_prompt_strict", "if_inst_strict", "mcq_acc", "gen_rougeL", "gen_bleu"}
        assert 0 <= scores["mcq_acc"] <= 1 and 0 <= scores["gen_bleu"] <= 100
    assert [r["model"] for r in summary["training"]] == list(MODELS)
    assert {r["from"] for r in summary["training"]} == {"init", "base", "instruct"}
    for name in MODELS:
        record = json.loads((out / "models" / name / "medmerge_train.json").read_text())
        assert record["kind"] == "full_model" and record["result"]["steps"] > 0
        assert (out / "eval" / name / "results.json").is_file()
    # the regime: each model's move from its parent, checked here against a direct computation
    from safetensors.torch import load_file

    tv = summary["task_vectors"]
    assert {n: r["parent"] for n, r in tv["relative_norm"].items()} == {
        "base": "init", "instruct": "base", "clinical": "base", "instruct_ft": "instruct"}
    base, inst = (load_file(str(out / "models" / n / "model.safetensors")) for n in ("base", "instruct"))
    body = [k for k in base if "embed_tokens" not in k and "lm_head" not in k]
    delta = torch.cat([(inst[k].double() - base[k].double()).flatten() for k in body]).norm()
    parent = torch.cat([base[k].double().flatten() for k in body]).norm()
    assert tv["relative_norm"]["instruct"]["non_embedding"] == pytest.approx(float(delta / parent), rel=1e-9)
    assert -1 <= tv["cosine_instruct_clinical"]["non_embedding"] <= 1
    assert "non-embedding delta" in (out / "summary.md").read_text()


def test_models_load_generate_and_share_one_base(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = built[0] / "world"
    tok = AutoTokenizer.from_pretrained(str(out / "models" / "instruct"))
    shapes = None
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(str(out / "models" / name))
        ids = tok("the patient", return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert gen.shape[1] > ids.shape[1]
        these = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes is None or these == shapes  # same architecture: mergeable
        shapes = these
    # clinical and instruct both descend from base: their records name it
    for name in ("instruct", "clinical"):
        record = json.loads((out / "models" / name / "medmerge_train.json").read_text())
        assert Path(record["base"]["path"]).name == "base"
    assert torch.is_tensor(gen)


def test_second_build_comes_from_the_cache(built, monkeypatch):
    root, cache = built
    monkeypatch.setenv("MEDMERGE_CACHE", str(cache))
    result = CliRunner().invoke(app, ["miniclinic", "build", str(root / "again"), "--preset", "quick", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((root / "again" / "summary.json").read_text())
    assert summary["scores"] == json.loads((root / "world" / "summary.json").read_text())["scores"]
    assert "from cache" in result.output
