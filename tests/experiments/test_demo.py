"""`medmerge demo --preset quick` end to end (the world from the session's cache), and its report in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

from browser import chromium_path, render
from typer.testing import CliRunner

from medmerge.cli import app


def test_quick_demo_end_to_end(quick_world, tmp_path, monkeypatch):
    _, cache = quick_world
    monkeypatch.setenv("MEDMERGE_CACHE", str(cache))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--preset", "quick", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    demo = json.loads((out / "demo.json").read_text())
    assert demo["preset"] == "quick" and "report:" in result.output
    names = [m["name"] for m in demo["forgetting"]["models"]]
    assert names == ["base", "instruct", "instruct_ft", "clinical"]
    sweep = json.loads((out / "sweep" / "sweep_summary.json").read_text())
    methods = {json.loads(line)["method"] for line in (out / "sweep" / "sweep.jsonl").read_text().splitlines()}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_ties"} <= methods
    assert sweep["evaluations"]["run"] > 0 and sweep["pareto"]
    few = json.loads((out / "fewshot" / "fewshot.json").read_text())
    assert sorted({r["k"] for r in few["runs"]}) == [16, 64, 256] and few["claim"]["statement"]
    # the forgetting the demo shows is measured, not assumed: both numbers come from the sweep's references
    refs = sweep["references"]
    assert demo["forgetting"]["models"][2]["if_score"] == refs["instruct_ft"]["if_score"]
    md = (out / "report.md").read_text()
    assert "Forgetting" in md and "Few-shot efficiency" in md and "Pareto" in md
    if chromium_path():
        page = render(out / "report.html", out_dir=tmp_path)
        assert page["text_chars"] > 1000 and page["images"]
        assert all(img["loaded"] for img in page["images"]) and page["js_errors"] == []
    # a second run reuses the world and every cached sweep result
    result = CliRunner().invoke(app, ["demo", "--preset", "quick", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "sweep" / "sweep_summary.json").read_text())
    assert again["evaluations"]["run"] == 0
    assert Path(json.loads((out / "demo.json").read_text())["report"]).is_file()


def test_shipped_sweep_and_fewshot_examples_validate(quick_world, tmp_path):
    from medmerge.experiments.fewshot import load as load_fewshot
    from medmerge.experiments.sweep.config import load_config
    from medmerge.experiments.sweep.points import expand_grid

    world = quick_world[0] / "world"
    examples = Path(__file__).resolve().parents[2] / "examples"
    cfg, info = load_config(examples / "sweep_miniclinic.yaml", tmp_path, [f"world.dir={world}"])
    assert info["world"]["preset"] == "quick" and cfg.models["clinical"] == world / "models" / "clinical"
    assert len(expand_grid(cfg.grid)) == 31 and cfg.search.layer_groups == 2
    few, _ = load_fewshot(examples / "fewshot_miniclinic.yaml", tmp_path, [f"world.dir={world}"])
    assert few.k == [16, 64, 256] and few.claim.k == 64 and few.claim.versus_k == 256
