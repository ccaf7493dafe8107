"""The real-model recipe (`medmerge pipeline real`, `demo --preset real`) on a tiny GGUF and the shared data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.experiments import real
from medmerge.experiments.demo import forgetting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from gguf_writer import write_tiny_gguf  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "mts_dialog").is_dir(),
                                reason=f"the shared data folder was looked for at {DATA} and not found")
runner = CliRunner()


def flat(result) -> str:
    return " ".join(result.output.split())  # rich wraps long messages


@needs_data
def test_training_text_holds_no_evaluation_item():
    docs = real.clinical_documents(DATA, list(real.SOURCES))
    test_ids = set(json.loads((DATA / "pubmedqa" / "test_ground_truth.json").read_text()))
    pubmed = [d for d in docs if d["source"] == "pubmedqa"]
    assert len(pubmed) == 500 and not {d["id"] for d in pubmed} & test_ids
    assert {d["source"] for d in docs} == {"pubmedqa", "medquad", "mts_dialog"}  # MeQSum: scored on all its pairs
    test_dialogues = {r for r in (DATA / "mts_dialog" / "Main-Dataset" /
                                  "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv").read_text().split("\n") if len(r) > 200}
    assert not any(line in d["text"] for d in docs for line in list(test_dialogues)[:20])
    pairs = real.mts_pairs(DATA)
    assert len(pairs) == 1201 and pairs[0]["prompt"].startswith("Summarize the following doctor-patient conversation")


@needs_data
def test_shipped_recipe_is_valid_and_sized(tmp_path):
    """examples/real_smollm2.yaml (the packaged recipe): parses, and every config it writes validates."""
    from medmerge.experiments.fewshot import FewshotConfig
    from medmerge.experiments.sweep.config import SweepConfig

    assert (Path(__file__).resolve().parents[2] / "examples" / "real_smollm2.yaml").resolve() == real.RECIPE.resolve()
    cfg, _ = real.load(real.RECIPE, [f"data_dir={DATA}"])
    models = {n: str(tmp_path / n) for n in ("instruct", "clinical", "instruct_ft")}
    for stage in ("clinical", "instruct_ft"):
        raw = real._train_config(cfg, stage, tmp_path / "instruct", tmp_path / "data.jsonl")
        assert raw["training"]["threads"] == 2 and raw["training"]["device"] == "cpu"
    for domain in ("clinical", "instruct_ft"):
        sweep = SweepConfig.model_validate(real.sweep_config(cfg, models, domain))
        assert sweep.roles.base == "instruct" and {p["method"] for p in sweep.grid} == {
            "linear", "slerp", "task_arithmetic", "ties", "dare_ties"}
        assert sweep.eval.tasks == ["mm_ifeval", "mm_mts_dialog", "mm_meqsum", "mm_pubmedqa", "mm_medqa"]
    few = FewshotConfig.model_validate(real.fewshot_config(cfg, models, tmp_path / "sweep", tmp_path / "d.jsonl"))
    assert few.k == [16, 64, 256] and few.truncation == "prompt" and few.claim.k == 64


def test_forgetting_without_a_base_model():
    """Regression: the forgetting table assumed a `base` reference, which a real instruct model does not have."""
    refs = {n: {"if_score": s, "clinical_score": c} for n, s, c in
            (("instruct", 60.0, 20.0), ("instruct_ft", 10.0, 30.0), ("clinical", 55.0, 25.0))}
    f = forgetting({"references": refs, "if_metric": "i", "clinical_metrics": ["c"]})
    assert [m["name"] for m in f["models"]] == ["instruct", "instruct_ft", "clinical"]
    assert "60.0 to 10.0" in f["statement"]


def test_preset_real_needs_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DATA", raising=False)
    r = runner.invoke(app, ["demo", "--preset", "real", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--data-dir" in flat(r) and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def tiny_recipe(tmp_path: Path) -> Path:
    gguf, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    raw = yaml.safe_load(real.RECIPE.read_text())
    raw.update(data_dir=str(DATA), instruct={"gguf": str(gguf), "dtype": "float32"},
               clinical_corpus={"sources": ["pubmedqa", "mts_dialog"], "max_documents": 12},
               grid=[{"method": "linear", "t": [0.5]}, {"method": "ties", "t": [0.5], "density": [0.5]}])
    for stage in ("clinical", "instruct_ft"):
        raw[stage]["train"]["max_seq_length"] = 192  # the tiny byte-level BPE spends about a token per character
        raw[stage]["train"]["training"].update(max_steps=2, batch_size=2, logging_steps=1)
    raw["eval"].update(limit=2, max_new_tokens=4)
    raw["fewshot"].update(k=[2, 4], max_seq_length=192, claim={"model": "merged", "k": 2, "versus": "instruct",
                                                               "versus_k": 4})
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
@needs_data
def test_pipeline_real_end_to_end_on_a_tiny_gguf(tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "run"
    r = runner.invoke(app, ["pipeline", "real", str(recipe), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    names = [row["model"] for row in res["table"]]
    assert names[:2] == ["instruct", "clinical"] and "instruct_ft" in names
    assert set(res["table"][0]["tasks"]) == {"mm_ifeval", "mm_mts_dialog", "mm_meqsum", "mm_pubmedqa", "mm_medqa"}
    for name in ("instruct", "clinical", "instruct_ft"):
        assert (Path(res["models"][name]) / "config.json").is_file()
    assert json.loads((out / "models" / "instruct" / "medmerge_import.json").read_text())["verification"]["passed"]
    # the two sweeps: task vectors relative to instruct, five tasks, the report with both and the few-shot claim
    for domain in ("clinical", "instruct_ft"):
        cfg = yaml.safe_load((out / "configs" / f"sweep_{domain}.yml").read_text())
        assert cfg["roles"] == {"domain": domain, "general": "instruct", "base": "instruct"}
        assert (out / f"sweep_{domain}" / "sweep_summary.json").is_file()
    assert res["fewshot_claim"]["k"] == 2 and (out / "fewshot" / "fewshot.json").is_file()
    report = (out / "report.md").read_text()
    assert "Forgetting" in report and report.count("Merge sweep") + report.count("sweep") >= 2
    assert len((out / "data" / "clinical_text.jsonl").read_text().splitlines()) == 12
    # a finished run is kept unless --force; a re-run with --force of a finished step-set reuses nothing stale
    r = runner.invoke(app, ["pipeline", "real", str(recipe), "--out", str(out), "-q"])
    assert r.exit_code == 2 and "--force" in r.output


def test_recipe_errors_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DATA", raising=False)
    r = runner.invoke(app, ["pipeline", "real", str(real.RECIPE), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "${MEDMERGE_DATA} is not set" in flat(r) and "KEY=VALUE" in flat(r)
    r = runner.invoke(app, ["pipeline", "real", str(real.RECIPE), "--out", str(tmp_path / "run"),
                            f"data_dir={tmp_path / 'nowhere'}"])
    assert r.exit_code == 2 and "data_dir" in flat(r) and "is not a folder" in flat(r)
    r = runner.invoke(app, ["pipeline", "real", str(real.RECIPE), "--out", str(tmp_path / "run"),
                            f"data_dir={tmp_path}", "clinical.train.training.lr=-1"])
    assert r.exit_code == 2 and "lr" in flat(r), r.output
    assert not (tmp_path / "run").exists()


def test_point_key_holds_only_the_models_a_point_reads():
    """Regression: the instruct reference was scored again by the second sweep of the real recipe (sharing one
    cache), because every point's key held the fingerprints of all the sweep's models."""
    from medmerge.experiments.sweep.points import point_key

    ref = {"merge_method": "linear", "models": [{"model": "instruct", "parameters": {"weight": 1.0}}]}
    merge = {"merge_method": "ties", "base_model": "instruct",
             "models": [{"model": "clinical", "parameters": {"weight": 0.5}}]}
    a = {"instruct": "i", "clinical": "c"}
    b = {"instruct": "i", "instruct_ft": "f"}
    assert point_key(ref, a, always=("instruct",)) == point_key(ref, b, always=("instruct",))
    assert point_key(ref, a) != point_key(ref, {**a, "instruct": "i2"})  # the model it reads changed
    assert point_key(merge, a) != point_key(merge, {**a, "clinical": "c2"})
    assert point_key(merge, a) == point_key(merge, {**a, "other": "x"})
    # the loaded model (config and tokenizer of every evaluation) is always in the key
    assert point_key(ref, {**a, "load": "l"}, always=("load",)) != point_key(ref, {**a, "load": "l2"}, always=("load",))
