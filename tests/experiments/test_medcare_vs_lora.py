"""`medmerge pipeline medcare`: MedCare vs plain LoRA vs full fine-tuning (+ the keep-noise ablation), evaluated."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.experiments.medcare_vs_lora import ARMS

pytestmark = pytest.mark.slow


def test_experiment_pipeline_on_the_quick_world(quick_world, tmp_path):
    """examples/medcare_miniclinic.yaml end to end on the session's quick world, with tiny budgets."""
    root, _ = quick_world
    example = Path(__file__).resolve().parents[2] / "examples" / "medcare_miniclinic.yaml"
    small = {"batch_size": 4, "logging_steps": 2, "threads": 1}
    overrides = [f"world.dir={root / 'world'}", "eval.limit=4", "eval.batch_size=4", "eval.max_new_tokens=16",
                 *(f"{s}.training.{k}={v}" for s in ("stage1", "stage2", "lora", "full") for k, v in small.items()),
                 "stage1.training.max_steps=4", "stage2.training.max_steps=4",
                 "modules.ffn.noise_experts=4"]
    out = tmp_path / "medcare"
    res = CliRunner().invoke(app, ["pipeline", "medcare", str(example), *overrides, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == list(ARMS)
    for arm, info in results["arms"].items():
        assert {"mm_miniclinic_mcq/acc", "mm_miniclinic_align/prompt_level_strict_acc",
                "mm_miniclinic_if/prompt_level_strict_acc"} <= set(info["metrics"]), arm
    arms = results["arms"]
    assert arms["medcare"]["verified"]["ok"] and arms["medcare_stage1"]["verified"]["ok"]
    assert arms["lora"]["steps"] == arms["full"]["steps"] == 8  # stage 1 + stage 2 steps
    keep = load_file(str(out / "medcare_keep_noise" / "stage2" / "medcare_model.safetensors"))
    dropped = load_file(str(out / "medcare" / "stage2" / "medcare_model.safetensors"))
    assert any("noise_A" in k for k in keep) and not any("noise_A" in k for k in dropped)
    # both stage-2 variants start from the one stage-1 run
    assert arms["medcare"]["stage1"]["run"] == arms["medcare_keep_noise"]["stage1"]["run"]
    assert "metrics" not in arms["medcare"]["stage1"]  # the nested stage-1 record is a copy, not the arm
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS) and (out / "training.png").stat().st_size > 10_000
    res = CliRunner().invoke(app, ["pipeline", "medcare", str(example), *overrides, "--out", str(out), "-q"])
    assert res.exit_code == 2 and "--force" in res.output
