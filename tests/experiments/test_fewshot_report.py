"""`medmerge fewshot` on tiny models, and `medmerge report` rendered in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from browser import render, requires_chromium

from medmerge.errors import InputError, OutputExistsError
from medmerge.experiments.fewshot import run as run_fewshot
from medmerge.experiments.report import write_report
from medmerge.experiments.sweep.run import run as run_sweep


@pytest.fixture(scope="module")
def experiment(sweep_family, tmp_path_factory) -> Path:
    """A run folder holding a tiny sweep and a few-shot run that starts from its best merge."""
    root = sweep_family
    run = tmp_path_factory.mktemp("experiment")
    run_sweep(root / "sweep.yaml", run / "sweep", progress=False)
    rows = [{"prompt": f"say {w}", "response": w} for w in ("fever", "cough", "asthma", "dose", "pain", "rest")]
    with open(root / "ft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = {
        "starts": {"instruct": str(root / "instruct"), "merged": {"sweep": str(run / "sweep")}},
        "data": {"path": str(root / "ft.jsonl")},
        "k": [2, 4], "seed": 5, "max_seq_length": 32,
        "training": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "logging_steps": 1, "threads": 1,
                     "warmup_ratio": 0.0, "device": "cpu"},
        "eval": {"task_files": [str(root / "follow.yaml"), str(root / "clinic.yaml")], "limit": 4,
                 "batch_size": 4, "chat_template": "none", "device": "cpu"},
        "scores": {"if_metric": "tiny_follow/rouge1", "clinical_metrics": ["tiny_clinic/rouge1"]},
        "claim": {"model": "merged", "k": 2, "versus": "instruct", "versus_k": 4, "tolerance": 0.5},
    }
    (run / "fewshot.yaml").write_text(yaml.safe_dump(cfg))
    run_fewshot(run / "fewshot.yaml", run / "fewshot", progress=False)
    return run


def test_fewshot_runs_every_start_and_k_and_tests_the_claim(experiment):
    out = experiment / "fewshot"
    res = json.loads((out / "fewshot.json").read_text())
    assert [(r["start"], r["k"]) for r in res["runs"]] == [("instruct", 2), ("instruct", 4), ("merged", 2), ("merged", 4)]
    assert res["starts"]["merged"]["kind"] == "sweep best"
    assert (Path(res["starts"]["merged"]["path"]) / "medmerge.yml").is_file()  # exported by the engine
    for r in res["runs"]:
        record = json.loads((Path(r["train"]["path"]) / "medmerge_train.json").read_text())
        assert record["k_shot"]["k"] == r["k"] and record["result"]["steps"] == 2 and record["k_shot"]["seed"] == 5
    # nested subsets: the 2 examples are among the 4, for either start
    idx = {(r["start"], r["k"]): json.loads((Path(r["train"]["path"]) / "medmerge_train.json").read_text())
           ["k_shot"]["indices"] for r in res["runs"]}
    assert set(idx[("instruct", 2)]) <= set(idx[("instruct", 4)]) and idx[("instruct", 4)] == idx[("merged", 4)]
    claim = res["claim"]
    by = {(r["start"], r["k"]): r for r in res["runs"]}
    diff = by[("merged", 2)]["clinical_score"] - by[("instruct", 4)]["clinical_score"]
    assert claim["scores"]["clinical_score"]["difference"] == pytest.approx(diff)
    iv = claim["scores"]["clinical_score"]["interval"]  # paired bootstrap over the 4 evaluation documents
    assert iv["value"] == pytest.approx(diff) and iv["low"] <= diff + 1e-9 and diff - 1e-9 <= iv["high"]
    expect = ("holds" if iv["low"] >= -0.5 else "does not hold" if iv["high"] < -0.5
              else "cannot tell at this sample size")
    assert claim["verdict"] == expect and claim["holds"] == {"holds": True, "does not hold": False}.get(expect)
    assert expect in claim["measured"] and "paired bootstrap interval" in claim["measured"]
    per_doc = json.loads((out / "eval" / "merged-k2" / "results.json").read_text())["per_doc"]
    assert per_doc["tiny_clinic"]["doc_ids"] == [0, 1, 2, 3]
    assert "merged fine-tuned on 2 examples" in claim["statement"]
    assert (out / "fewshot.png").stat().st_size > 0 and (out / "loss_curves.png").is_file()
    with pytest.raises(InputError, match="finished few-shot run"):
        run_fewshot(experiment / "fewshot.yaml", out, progress=False)


def test_fewshot_config_errors_name_the_key(experiment, tmp_path):
    from medmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="claim: k=64 is not in k"):
        run_fewshot(experiment / "fewshot.yaml", tmp_path / "a", overrides=["claim.k=64"], progress=False)
    not_a_model = tmp_path / "empty"  # beside the run folder: a run inside an input is refused before this check
    not_a_model.mkdir()
    with pytest.raises(InputError, match="not a model folder"):
        run_fewshot(experiment / "fewshot.yaml", tmp_path / "b", overrides=[f"starts.instruct={not_a_model}"],
                    progress=False)


def test_report_markdown_and_html_hold_every_section(experiment):
    info = write_report(experiment, force=True)
    md = Path(info["md"]).read_text()
    for heading in ("## Models (sweep)", "## Score against interpolation weight", "## Few-shot efficiency (fewshot)",
                    "## Sweep configuration (sweep)", "IF retention %", "Claim: merged fine-tuned on 2"):
        assert heading in md
    for link in [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]:
        assert (experiment / link).is_file()
    page = Path(info["html"]).read_text()
    assert page.count("data:image/png;base64,") == info["images"] == 4 and "src=\"http" not in page
    with pytest.raises(OutputExistsError, match="--force"):
        write_report(experiment)


def test_report_refuses_a_folder_with_nothing_to_report(tmp_path):
    with pytest.raises(InputError, match="nothing to report"):
        write_report(tmp_path)


@requires_chromium
def test_report_renders_in_headless_chromium(experiment, tmp_path):
    info = write_report(experiment, force=True)
    page = render(Path(info["html"]), out_dir=tmp_path)
    assert page["text_chars"] > 500  # not blank
    assert len(page["images"]) == info["images"] == 4
    assert all(img["loaded"] and img["natural_width"] > 100 for img in page["images"]), page["images"]
    assert page["js_errors"] == []
    assert page["nonwhite_fraction"] > 0.02
