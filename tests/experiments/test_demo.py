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


def test_finding_states_the_cure_the_front_and_the_dead_zone_per_setting():
    from medmerge.experiments.demo import finding

    def row(label, method, params, if_pct, gain_pct, pareto=False):
        return {"kind": "grid", "label": label, "method": method, "params": params, "if_score": 0.7 * if_pct,
                "clinical_score": 20 + 0.2 * gain_pct, "if_retention_pct": if_pct, "clinical_gain_kept_pct": gain_pct,
                "if_retention_ci": {"low": if_pct - 10, "high": if_pct + 10}, "clinical_gain_kept_ci": None, "pareto": pareto}

    rows = [{"kind": "reference", "label": "instruct", "method": None, "params": {}, "pareto": True},
            row("ta t=0.3 l=1", "task_arithmetic", {"t": 0.3, "lambda": 1.0}, 13, 49.8),
            row("ta t=0.35 l=1.8", "task_arithmetic", {"t": 0.35, "lambda": 1.8}, 95.7, 67.8, pareto=True),
            row("ties t=0.4", "ties", {"t": 0.4, "density": 0.9}, 94.3, 71.8, pareto=True),
            row("ties t=0.5", "ties", {"t": 0.5, "density": 0.9}, 89.9, 99.0),  # just under 90% of IF
            row("linear t=0.2", "linear", {"t": 0.2}, 24.3, 23.9), row("linear t=0.3", "linear", {"t": 0.3}, 12.9, 40),
            row("linear grad", "linear", {"t": [0.2, 0.8]}, 1, 1)]
    refs = {"references": {"instruct": {"if_score": 70.0, "clinical_score": 19.2},
                           "clinical": {"if_score": 0.0, "clinical_score": 39.3}}}
    f = finding(refs, rows)
    assert f["merges"] == 7 and f["keep_both"] == ["ta t=0.35 l=1.8", "ties t=0.4"]
    assert f["top"]["label"] == "ties t=0.4" and f["pareto_methods"] == ["task_arithmetic", "ties"]
    assert not f["front_is_l"]
    # the dead zone names each setting, so lambda 1 at t = 0.3 is not mistaken for the lambda 1.8 curve
    assert f["dead_zone"] == {"task_arithmetic lambda=1": [0.3], "linear": [0.2, 0.3, [0.2, 0.8]]}
    assert ("Of 7 merges, 2 keep at least 90% of instruct's instruction following and at least 50% of the clinical "
            "gain; the one keeping most of the gain, ties t=0.4, keeps 94.3 [84.3, 104.3]% of IF and 71.8% of the gain"
            ) in f["statement"]
    assert "Dead zone (under half of both skills): linear at t = 0.2, 0.3; task_arithmetic lambda=1 at t = 0.3." \
        in f["statement"]
    assert "L-shaped" in finding(refs, [rows[0], rows[1]])["statement"]
    # a clinical model no better than instruct (or an instruct that follows nothing) leaves nothing to keep a share of
    refs["references"]["clinical"]["clinical_score"] = 22.5
    weak = finding(refs, rows)
    assert weak["keep_both"] == [] and weak["top"] is None and "gains +3.3 points" in weak["statement"]
    # ... but the merges that keep IF are still described, in points
    assert ("gains +3.3 points over instruct (under 5), so a share of them would be noise. In points: of the merges "
            "keeping at least 90% of instruct's IF, ties t=0.4 scores highest on the clinical composite, 34.4 (IF 66.0), "
            "against instruct's 19.2 and the clinical model's 22.5.") in weak["statement"]
    refs["references"]["clinical"]["clinical_score"] = 39.3
    refs["references"]["instruct"]["if_score"] = 4.0
    assert "instruct follows only 4.0% of the prompts (under 5%)" in finding(refs, rows)["statement"]
