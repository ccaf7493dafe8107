"""Bad evaluation input fails before a model is loaded, naming the file, line or column; `medmerge compare` formulas."""

import json
from pathlib import Path
from typing import Optional

import pytest

from medmerge.errors import InputError, MedmergeError
from medmerge.evaluation import data
from medmerge.evaluation.compare import compare, render_markdown
from medmerge.evaluation.runner import evaluate, parse_gen_kwargs
from medmerge.io.folders import check_adapter
from medmerge.evaluation.taskfile import load_task_file
from medmerge.tiny import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "m", arch="llama", seed=0, hidden=32, layers=2, vocab=64)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_data_file_names_the_file_and_the_public_copy(tiny, tmp_path):
    (tmp_path / "data").mkdir()  # beside OUT: an output may not lie inside an input
    with pytest.raises(data.DataError) as e:
        evaluate(tiny, ["mm_medqa"], tmp_path / "out", data_dir=tmp_path / "data")
    msg = str(e.value)
    assert str(tmp_path / "data" / "medqa" / "test.jsonl") in msg and "sampled_50.jsonl" in msg
    assert "github.com/gersteinlab/medagents-benchmark" in msg
    assert not (tmp_path / "out").exists()


def test_no_data_dir_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("MEDMERGE_DATA", raising=False)
    with pytest.raises(data.DataError, match="--data-dir DIR or set MEDMERGE_DATA"):
        data.load_meqsum(None)


def test_wrong_or_missing_columns_name_line_and_column(tmp_path):
    _jsonl(tmp_path / "medqa" / "test.jsonl", [
        {"question": "q1", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"},
        {"question": "q2", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}},
    ])
    with pytest.raises(data.DataError, match=r"test.jsonl, record 2: missing column\(s\) 'answer_idx'"):
        data.load_medqa(tmp_path)
    _jsonl(tmp_path / "medmcqa" / "test.jsonl", [{"question": "q", "options": {"A": "a"}, "answer_idx": "A"}])
    with pytest.raises(data.DataError, match="line 1: 'options' must map A, B, C and D"):
        data.load_medmcqa(tmp_path)
    (tmp_path / "mts_dialog" / "Main-Dataset").mkdir(parents=True)
    (tmp_path / "mts_dialog" / "Main-Dataset" / "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv").write_text(
        "ID,section_header,dialogue\n0,GENHX,hello\n")
    with pytest.raises(data.DataError, match=r"line 2: missing column\(s\) 'section_text' \(columns found: ID, dialogue"):
        data.load_mts_dialog(tmp_path)
    (tmp_path / "meqsum").mkdir()
    (tmp_path / "meqsum" / "meqsum.jsonl").write_text('{"chq": "x", "summary": "y"}\n{not json\n')
    with pytest.raises(data.DataError, match="meqsum.jsonl, line 2: not valid JSON"):
        data.load_meqsum(tmp_path)


@pytest.mark.slow  # indexes all of lm-eval's built-in tasks (about 15 s)
def test_unknown_task_lists_the_shipped_ones(tiny, tmp_path):
    with pytest.raises(MedmergeError, match=r"unknown task\(s\) mm_nonsense; shipped tasks: mm_ifeval"):
        evaluate(tiny, ["mm_nonsense"], tmp_path / "out", data_dir=tmp_path / "data")


def test_missing_model_folder_and_hub_ids(tmp_path):
    with pytest.raises(InputError, match="does not exist; pass the path of a local model folder"):
        evaluate(tmp_path / "nope", ["mm_medqa"], tmp_path / "out")
    with pytest.raises(InputError, match="hub id"):
        evaluate("meta-llama/Llama-3.1-8B-Instruct", ["mm_medqa"], tmp_path / "out")


def test_adapter_for_another_base_is_refused(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = make_model(tmp_path / "other", arch="llama", seed=1, hidden=48, layers=2, vocab=64)
    model = AutoModelForCausalLM.from_pretrained(str(other))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(InputError, match=r"trained for another base: .*q_proj.lora_A.weight has shape \[2, 48\]"):
        check_adapter(tmp_path / "lora", tiny)
    with pytest.raises(InputError, match="has no adapter_config.json"):
        check_adapter(tmp_path, tiny)
    with pytest.raises(InputError, match="is a PEFT adapter, not a model"):
        evaluate(tmp_path / "lora", ["mm_medqa"], tmp_path / "out")


def test_task_file_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "ref": "b"}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: summary\nprompt: '{input}'\n")
    with pytest.raises(data.DataError, match=r"d.jsonl, record 1: missing column\(s\) 'summary' \(columns found: ref, text\)"):
        load_task_file(spec)
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: 'Summarize'\n")
    with pytest.raises(data.DataError, match="prompt must contain '{input}'"):
        load_task_file(spec)
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\nmetrics: [bleurt]\n")
    with pytest.raises(data.DataError, match="unknown metric 'bleurt'"):
        load_task_file(spec)
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\nprompt: '{input}'\ntemperature: 1\n")
    with pytest.raises(data.DataError, match=r"missing key\(s\) target"):
        load_task_file(spec)
    spec.write_text("name: t\ndata: missing.csv\ninput: text\ntarget: ref\nprompt: '{input}'\n")
    with pytest.raises(data.DataError, match="missing.csv does not exist"):
        load_task_file(spec)
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: 'In: {input}'\nmetrics: rouge\n")
    task = load_task_file(spec)
    assert task.metrics == ("rouge",) and task.render({"text": "x {y}"}) == "In: x {y}"


def test_gen_kwargs_parsing():
    assert parse_gen_kwargs("temperature=0.7,top_p=0.9,do_sample=true,max_new_tokens=64") == {
        "temperature": 0.7, "top_p": 0.9, "do_sample": True, "max_gen_toks": 64}
    with pytest.raises(MedmergeError, match="not KEY=VALUE"):
        parse_gen_kwargs("temperature")


# --- compare --------------------------------------------------------------------------------------


def _results(folder: Path, tasks: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"schema": "medmerge.eval/1", "tasks": tasks}))
    return folder


def test_compare_formulas_by_hand(tmp_path):
    ifeval = lambda p, i: {"prompt_level_strict_acc": p, "inst_level_strict_acc": i,  # noqa: E731
                           "prompt_level_loose_acc": p, "inst_level_loose_acc": i}
    instruct = _results(tmp_path / "instruct", {"mm_ifeval": ifeval(0.8, 0.9), "mm_meqsum": {"composite": 20.0},
                                                "mm_medqa": {"acc": 0.40}})
    clinical = _results(tmp_path / "clinical", {"mm_ifeval": ifeval(0.4, 0.5), "mm_meqsum": {"composite": 30.0},
                                                "mm_medqa": {"acc": 0.60}})
    merged = _results(tmp_path / "merged", {"mm_ifeval": ifeval(0.7, 0.8), "mm_meqsum": {"composite": 28.0},
                                            "mm_medqa": {"acc": 0.50}})
    report = compare([merged], {"instruct": instruct, "clinical": clinical}, out=tmp_path / "cmp")
    rows = {r["name"]: r for r in report["models"]}
    # IF = mean of the four IFEval accuracies x 100: instruct 85, clinical 45, merged 75
    assert rows["instruct"]["if_score"] == pytest.approx(85)
    assert rows["merged"]["if_score"] == pytest.approx(75)
    # clinical = mean(meqsum composite, medqa acc x 100): instruct 30, clinical 45, merged 39
    assert report["clinical_metrics"] == ["mm_medqa/acc", "mm_meqsum/composite"]
    assert rows["merged"]["clinical_score"] == pytest.approx(39)
    assert rows["merged"]["if_retention_pct"] == pytest.approx(100 * 75 / 85)
    assert rows["merged"]["clinical_gain_kept_pct"] == pytest.approx(100 * (39 - 30) / (45 - 30))
    assert rows["clinical"]["clinical_gain_kept_pct"] == pytest.approx(100)
    assert rows["merged"]["deltas"]["instruct"]["mm_medqa/acc"] == pytest.approx(0.10)
    assert rows["merged"]["deltas"]["clinical"]["if_score"] == pytest.approx(30)
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"comparison.md", "comparison.json", "tradeoff.png"}
    assert (tmp_path / "cmp" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    md = render_markdown(report)
    assert "| merged | 75.00 | 39.00 | 88.2 | 60.0 |" in md
    one = compare([merged], {"instruct": instruct, "clinical": clinical}, if_metric="mm_ifeval/prompt_level_strict_acc",
                  clinical_metrics=["mm_meqsum/composite"])
    assert {r["name"]: r["if_score"] for r in one["models"]}["merged"] == pytest.approx(70)
    assert {r["name"]: r["clinical_gain_kept_pct"] for r in one["models"]}["merged"] == pytest.approx(80)


def test_compare_undefined_gain_and_bad_inputs(tmp_path):
    a = _results(tmp_path / "a", {"mm_medqa": {"acc": 0.5}})
    b = _results(tmp_path / "b", {"mm_medqa": {"acc": 0.5}})
    report = compare([a], {"instruct": a, "clinical": b})
    assert all(r["clinical_gain_kept_pct"] is None for r in report["models"])
    assert any("gain kept is undefined" in n for n in report["notes"])
    (tmp_path / "bad.json").write_text('{"results": {}}')
    with pytest.raises(InputError, match="not a medmerge results file"):
        compare([tmp_path / "bad.json"], {})
    with pytest.raises(InputError, match="does not exist"):
        compare([tmp_path / "none"], {})


def _per_doc_results(folder: Path, if_docs: list, acc_docs: list, model: Optional[Path] = None) -> Path:
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    res = {"schema": "medmerge.eval/1", "model": {"path": str(model) if model else None},
           "tasks": {"mm_ifeval": {"prompt_level_strict_acc": mean(if_docs)}, "mm_medqa": {"acc": mean(acc_docs)}},
           "per_doc": {"mm_ifeval": {"doc_ids": list(range(len(if_docs))), "prompt_level_strict_acc": if_docs},
                       "mm_medqa": {"doc_ids": list(range(len(acc_docs))), "acc": acc_docs}}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def test_compare_gives_paired_bootstrap_intervals_from_per_document_values(tmp_path):
    import random

    rng = random.Random(0)
    flip = lambda p: [1.0 if rng.random() < p else 0.0 for _ in range(120)]  # noqa: E731
    instruct = _per_doc_results(tmp_path / "instruct", flip(0.7), flip(0.3))
    clinical = _per_doc_results(tmp_path / "clinical", flip(0.1), flip(0.9))
    merged = _per_doc_results(tmp_path / "merged", flip(0.65), flip(0.6))
    old = _results(tmp_path / "old", {"mm_ifeval": {"prompt_level_strict_acc": 0.6}, "mm_medqa": {"acc": 0.5}})
    report = compare([merged, old], {"instruct": instruct, "clinical": clinical},
                     if_metric="mm_ifeval/prompt_level_strict_acc", replicates=500, seed=3)
    rows = {r["name"]: r for r in report["models"]}
    m = rows["merged"]
    for key in ("if_retention", "clinical_gain_kept"):
        ci = m[f"{key}_ci"]
        assert ci["value"] == pytest.approx(m[f"{key}_pct"]) and ci["low"] < ci["value"] < ci["high"]
        assert ci["replicates"] == 500
    assert rows["old"]["if_retention_ci"] is None and rows["old"]["clinical_gain_kept_ci"] is None
    md = render_markdown(report)
    assert f"{m['if_retention_pct']:.1f} [{m['if_retention_ci']['low']:.1f}, " in md and "paired bootstrap" in md
    again = compare([merged], {"instruct": instruct, "clinical": clinical},
                    if_metric="mm_ifeval/prompt_level_strict_acc", replicates=500, seed=3)
    assert {r["name"]: r["if_retention_ci"] for r in again["models"]}["merged"] == m["if_retention_ci"]
    with pytest.raises(MedmergeError, match="--replicates 5"):
        compare([merged], {"instruct": instruct}, replicates=5)


def test_compare_base_adds_task_vectors_of_the_compared_models(tmp_path):
    base = make_model(tmp_path / "m" / "base", arch="llama", seed=1, hidden=16, layers=1, vocab=64)
    tuned = make_model(tmp_path / "m" / "tuned", arch="llama", seed=2, hidden=16, layers=1, vocab=64)
    ifd, acc = [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]
    a = _per_doc_results(tmp_path / "a", ifd, acc, model=tuned)
    b = _per_doc_results(tmp_path / "b", ifd, acc, model=tmp_path / "gone")
    report = compare([a, b], {"instruct": a}, base=base)
    from medmerge.merging.deltas import task_vectors

    assert report["task_vectors"]["models"]["instruct"] == task_vectors(base, {"instruct": tuned})["models"]["instruct"]
    assert any("b: model folder" in n and "is not there" in n for n in report["notes"])
    assert "Mergeability" in render_markdown(report)
