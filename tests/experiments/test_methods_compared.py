"""`medmerge compare-methods`: the split, the plan's refusals, the dev choice, held-out scoring, the verdicts, the
report, the command end to end on the tiny world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from medmerge.cli import app  # noqa: E402
from medmerge.errors import ConfigError  # noqa: E402
from medmerge.experiments.methods_compared import (  # noqa: E402
    MethodsConfig, differences, plan_methods, split_documents, summary_paragraphs,
)
from medmerge.experiments.report import write_report  # noqa: E402
from medmerge.experiments.sweep.points import Roles  # noqa: E402
from medmerge.experiments.sweep.scoring import add_relative  # noqa: E402
from medmerge.merging.methods import REGISTRY  # noqa: E402

# a setting of every method that weighs or merges two models (passthrough cannot: it is refused)
SETTINGS = {
    "linear": {"t": 0.4}, "slerp": {"t": 0.5}, "nuslerp": {"t": 0.5}, "multislerp": {"t": 0.5},
    "task_arithmetic": {"t": 0.5, "lambda": 1.2}, "ties": {"t": 0.5, "density": 0.6},
    "dare_ties": {"t": 0.5, "density": 0.6}, "dare_linear": {"t": 0.5, "density": 0.6},
    "della": {"t": 0.5, "density": 0.6, "epsilon": 0.1}, "della_linear": {"t": 0.5, "density": 0.6},
    "breadcrumbs": {"t": 0.5, "density": 0.8, "gamma": 0.05}, "breadcrumbs_ties": {"t": 0.5, "density": 0.8},
    "model_stock": {"filter_wise": True}, "karcher": {"max_iter": 5}, "sce": {"select_topk": 0.5},
    "ram": {"epsilon": 1e-4}, "ramplus_tl": {"r": 0.2}, "nearswap": {"t": 0.01}, "arcee_fusion": {},
}


def _config(**changes) -> MethodsConfig:
    raw = {"models": {"base": "/m/base", "clinical": "/m/clinical", "instruct": "/m/instruct"},
           "eval": {"tasks": ["a", "b"]}, "split": {"dev": 3},
           "methods": {"linear": [{"t": 0.2}, {"t": 0.8}], "ties": [{"t": 0.5, "density": 0.5},
                                                                 {"t": 0.5, "density": 0.9}]}}
    raw.update(changes)
    return MethodsConfig(**raw)


def test_split_is_disjoint_seeded_and_refuses_small_tasks():
    counts = {"if_task": 12, "clinical_task": 9}
    dev, held = split_documents(counts, 4, None, seed=3)
    for task, n in counts.items():
        assert len(dev[task]) == 4 and not set(dev[task]) & set(held[task])
        assert sorted(dev[task] + held[task]) == list(range(n))  # the rest of the task is held out
    assert split_documents(counts, 4, None, seed=3) == (dev, held)
    other, _ = split_documents(counts, 4, None, seed=4)
    assert other != dev and dev["if_task"] != list(range(4))  # a permutation, not the first documents
    _, capped = split_documents(counts, 4, 5, seed=3)
    assert [len(v) for v in capped.values()] == [5, 5] and set(capped["if_task"]) <= set(held["if_task"])
    with pytest.raises(ConfigError, match="task clinical_task has 9 documents"):
        split_documents(counts, 9, None, seed=0)
    with pytest.raises(ConfigError, match="task clinical_task has 9 documents, which cannot hold dev 4 \\+ held_out 6"):
        split_documents(counts, 4, 6, seed=0)


def test_every_two_model_method_has_a_checked_merge_config():
    cfg = _config(methods={m: [s] for m, s in SETTINGS.items()})
    points, left_out = plan_methods(cfg)
    assert set(points) == set(SETTINGS)
    configs = {m: p[0].merge_config(Roles(), 0) for m, p in points.items()}
    assert configs["ties"]["base_model"] == "base" and configs["ties"]["models"][0]["parameters"]["weight"] == 0.5
    assert configs["karcher"]["models"] == [{"model": "clinical"}, {"model": "instruct"}] \
        and configs["karcher"]["parameters"] == {"max_iter": 5} and "base_model" not in configs["karcher"]
    assert configs["sce"]["base_model"] == "base" and configs["sce"]["parameters"] == {"select_topk": 0.5}
    # a two-input method with a base merges the domain model into the general one (as slerp)
    assert configs["nearswap"] == {**configs["nearswap"], "base_model": "instruct", "models": [{"model": "clinical"}],
                                   "parameters": {"t": 0.01}}
    assert configs["arcee_fusion"]["base_model"] == "instruct" and "parameters" not in configs["arcee_fusion"]
    left = {x["method"]: x["reason"] for x in left_out}
    assert "stacks" in left["passthrough"] and set(left) == set(REGISTRY) - set(SETTINGS)


def test_per_model_values_go_to_their_roles_and_paths_resolve(tmp_path):
    cfg = _config(methods={"ties": [{"t": 0.5, "density": 0.5, "models": {"clinical": {"density": 0.3}}},
                                    {"t": 0.5, "density": 0.9}]})
    ties = plan_methods(cfg)[0]["ties"][0].merge_config(Roles(), 0)
    assert [m["parameters"]["density"] for m in ties["models"]] == [0.3, 0.5]
    assert plan_methods(cfg)[0]["ties"][0].describe() == "ties t=0.5 density=0.5 clinical.density=0.3"
    bad = _config(methods={"ties": [{"t": 0.5, "models": {"base": {"density": 0.3}}}, {"t": 0.6}]})
    with pytest.raises(ConfigError, match=r"methods.ties\[0\]: .*models.base: this merge's inputs are clinical, "
                                          "instruct"):
        plan_methods(bad)
    if "regmean" in REGISTRY:  # statistics folders: per model, relative to the config file
        from medmerge.experiments.methods_compared import load_config

        raw = yaml.safe_load(yaml.safe_dump({
            "models": {"clinical": "c", "instruct": "i"}, "eval": {"tasks": ["a"]}, "split": {"dev": 2},
            "methods": {"regmean": [{"t": 0.5, "models": {"clinical": {"stats": "stats/c"},
                                                          "instruct": {"stats": "stats/i"}}}]}}))
        (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(raw))
        loaded, _ = load_config(tmp_path / "cmp.yaml", tmp_path / "out")
        config = plan_methods(loaded)[0]["regmean"][0].merge_config(Roles(), 0)
        assert [m["parameters"]["stats"] for m in config["models"]] == [str(tmp_path / "stats/c"),
                                                                        str(tmp_path / "stats/i")]


@pytest.mark.parametrize("changes, words", [
    ({"methods": {"linear": [{"t": 0.2}], "lineer": [{"t": 0.5}]}}, "unknown merge method 'lineer'; available: "),
    ({"left_out": {"tiez": "slow"}}, "left_out: unknown merge method 'tiez'"),
    ({"methods": {"linear": [{"t": 0.2}, {"t": 0.5}, {"t": 0.8}], "ties": [{"t": 0.5}, {"t": 0.6}]}},
     r"unequal budgets \(linear has 3, ties has 2\).*give ties 3, or set `budget: unequal_ok`"),
    ({"methods": {"linear": [{"t": 0.2}, {"t": 0.2}]}}, r"methods.linear\[1\] repeats an earlier setting"),
    ({"methods": {"passthrough": [{}]}}, "passthrough: stacks or copies the layers"),
    ({"methods": {"linear": [{"t": 1.5}]}}, r"methods.linear\[0\]: .*outside \[0, 1\]"),
    ({"methods": {"karcher": [{"t": 0.5}]}}, "karcher has no parameter 't' .*no share t"),
    ({"roles": {"base": "instruct"}, "methods": {"model_stock": [{}]}}, "needs at least 3 input models .*left_out:"),
])
def test_the_plan_refuses_what_cannot_be_compared(changes, words):
    with pytest.raises(ConfigError, match=words):
        plan_methods(_config(**changes))


def test_budgets_unequal_only_when_asked_and_parameterless_methods_take_one():
    methods = {"linear": [{"t": 0.2}, {"t": 0.5}, {"t": 0.8}], "ties": [{"t": 0.5}, {"t": 0.6}]}
    points, _ = plan_methods(_config(methods=methods, budget="unequal_ok"))
    assert [len(p) for p in points.values()] == [3, 2]
    points, _ = plan_methods(_config(methods={"linear": [{"t": 0.2}, {"t": 0.5}], "arcee_fusion": [{}]}))
    assert len(points["arcee_fusion"]) == 1
    with pytest.raises(ValueError, match="eval.subset: the documents come from split"):
        _config(eval={"tasks": ["a"], "subset": 4})


def test_choose_setting_follows_the_rule_then_falls_back_to_the_objective():
    from medmerge.experiments.methods_compared import choose_setting
    from medmerge.experiments.sweep.config import Select

    rows = [{"if_score": 40, "clinical_score": 30}, {"if_score": 30, "clinical_score": 35},
            {"if_score": 20, "clinical_score": 50}]
    objective = lambda r: r["if_score"]  # noqa: E731
    pick = choose_setting(rows, Select(if_retention_min=50), 50.0, objective)  # floor 25: rows 0 and 1
    assert (pick["index"], pick["by"], pick["feasible"], pick["threshold"]) == (1, "rule", 2, 25.0)
    assert "among the 2 of 3 settings whose IF is at least 25.0" in pick["why"]
    assert choose_setting(rows, Select(if_retention_min=None), 50.0, objective)["index"] == 2
    assert choose_setting(rows, Select(if_retention_min=50, maximize="if"), 50.0, objective)["index"] == 0
    fallback = choose_setting(rows, Select(if_retention_min=95), 50.0, objective)  # floor 47.5: none
    assert (fallback["index"], fallback["by"]) == (0, "objective")
    assert "no setting met the IF floor (47.5)" in fallback["why"]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["methods_compared_miniclinic.yaml", "methods_compared_real.yaml"])
def test_the_example_configs_plan_every_method_with_equal_budgets(name, tmp_path, monkeypatch):
    from medmerge.experiments.methods_compared import load_config

    world = tmp_path / "world"  # a stand-in for a built world: the plan opens no model
    world.mkdir()
    (world / "summary.json").write_text(json.dumps({"preset": "quick", "seed": 0}))
    monkeypatch.setenv("MEDMERGE_REAL_RUN", str(tmp_path / "real"))
    monkeypatch.setenv("MEDMERGE_DATA", str(tmp_path / "data"))
    overrides = [f"world={{dir: {world}}}"] if "miniclinic" in name else []
    cfg, _ = load_config(EXAMPLES / name, tmp_path / "out", overrides)
    points, left_out = plan_methods(cfg, name)
    assert {len(p) for m, p in points.items() if m != "arcee_fusion"} == {2} and len(points) >= 18
    assert set(points) | {x["method"] for x in left_out} == set(REGISTRY)


def _per_doc(values: dict[str, list[float]]) -> dict:
    return {task: {"doc_ids": list(range(len(v))), "score": v} for task, v in values.items()}


def _row(method, if_values, clin_values, kind="chosen"):
    f, c = sum(if_values) / len(if_values), sum(clin_values) / len(clin_values)
    return {"method": method, "label": f"{method} t=0.5", "kind": kind, "if_score": 100 * f, "clinical_score": 100 * c,
            "tasks": {"f": {"score": f}, "c": {"score": c}},
            "per_doc": _per_doc({"f": if_values, "c": clin_values})}


def _result(rows, refs, diffs) -> dict:
    return {"held_out": {"rows": rows, "references": refs}, "differences": diffs,
            "split": {"documents": {"f": {"held_out": 40}, "c": {"held_out": 40}}},
            "select": {"rule": "maximise the clinical score"}, "winner": None,
            "chosen": {r["method"]: {"by": "rule"} for r in rows}}


def test_verdicts_and_the_paragraph_follow_the_numbers():
    n = 40
    refs = {"instruct": _row("reference", [1.0] * n, [0.0] * n, "reference"),
            "clinical": _row("reference", [0.5] * n, [1.0] * n, "reference")}
    # a and b differ on 4 of 40 clinical documents, 3 for a and 1 for b (within noise); c keeps half the gain
    a = _row("a", [1.0] * n, [1.0] * 30 + [0.0] * 10)
    b = _row("b", [1.0] * n, [1.0] * 27 + [0.0] * 3 + [1.0] + [0.0] * 9)
    c = _row("c", [1.0] * n, [1.0, 0.0] * 10 + [0.0] * 20)
    rows = [a, b, c]
    add_relative([*refs.values(), *rows], refs, Roles(), "f/score", ["c/score"], seed=0, replicates=300)
    diffs = differences(rows, refs, Roles(), "f/score", ["c/score"], seed=0, replicates=300)
    clin = diffs["clinical_gain_kept_pct"]
    assert clin["best"] == "a" and clin["methods"]["a"]["verdict"] == "best"
    assert clin["methods"]["b"]["verdict"] == "within noise" and clin["methods"]["b"]["value"] == pytest.approx(-5)
    assert clin["methods"]["b"]["low"] < 0 < clin["methods"]["b"]["high"]
    assert clin["methods"]["c"]["verdict"] == "behind" and clin["methods"]["c"]["high"] < 0
    assert clin["methods"]["c"]["value"] == pytest.approx(-50)
    # every method keeps all of instruct's IF on identical documents: the interval is [0, 0], which holds 0
    assert {m["verdict"] for m in diffs["if_retention_pct"]["methods"].values()} == {"best", "within noise"}
    text = " ".join(summary_paragraphs(_result(rows, refs, diffs)))
    assert "On clinical gain kept, `a` leads with 75.0 [" in text
    assert "Within noise of it (the 95% paired interval of the difference contains 0): b (-5.0," in text
    assert "Behind it beyond noise: c by 50.0 points" in text
    assert "On IF retained, `a` leads with 100.0" in text and "No other method is distinguishable from it" in text

    # the same paragraph when b is far behind too: the text changes with the numbers
    b2 = _row("b", [1.0] * n, [0.0] * n)
    rows2 = [a, b2, c]
    add_relative([*refs.values(), *rows2], refs, Roles(), "f/score", ["c/score"], seed=0, replicates=300)
    diffs2 = differences(rows2, refs, Roles(), "f/score", ["c/score"], seed=0, replicates=300)
    text2 = " ".join(summary_paragraphs(_result(rows2, refs, diffs2)))
    assert "Within noise of it" not in text2.split("On clinical gain kept")[1]
    assert "Behind it beyond noise: b by 75.0 points" in text2


# --- end to end on the tiny world --------------------------------------------------------------------------------

TINY_METHODS = {"linear": [{"t": 0.2}, {"t": 0.8}], "ties": [{"t": 0.3, "density": 0.5}, {"t": 0.7, "density": 0.9}],
                "karcher": [{"max_iter": 3}, {"max_iter": 8}], "arcee_fusion": [{}]}


@pytest.fixture(scope="module")
def tiny_run(sweep_family, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = yaml.safe_load((sweep_family / "sweep.yaml").read_text())
    cfg.pop("grid")
    cfg["scores"]["clinical_metrics"] = ["tiny_clinic/rouge1"]  # per-document values: intervals on both axes
    cfg.update({"methods": TINY_METHODS, "split": {"dev": 3, "seed": 5}, "replicates": 200,
                "select": {"if_retention_min": 15}, "left_out": {"sce": "not needed in this test"}})
    config = sweep_family / "compare.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path_factory.mktemp("compare") / "run"
    result = CliRunner().invoke(app, ["compare-methods", str(config), str(out), "-q"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return config, out, json.loads((out / "methods_compared.json").read_text())


def test_end_to_end_chooses_on_dev_and_judges_on_held_out(tiny_run):
    config, out, res = tiny_run
    split = res["split"]
    for task in ("tiny_follow", "tiny_clinic"):
        dev, held = split["dev_ids"][task], split["held_out_ids"][task]
        assert len(dev) == 3 and len(held) == 5 and not set(dev) & set(held)
    # dev rows: every setting, scored on dev documents only
    assert len(res["dev"]["rows"]) == 7 and res["budget"]["settings"] == {"linear": 2, "ties": 2, "karcher": 2,
                                                                          "arcee_fusion": 1}
    for r in [*res["dev"]["rows"], *res["dev"]["references"].values()]:
        for task in ("tiny_follow", "tiny_clinic"):
            assert r["per_doc"][task]["doc_ids"] == split["dev_ids"][task]
    # the chosen setting is the dev-best under the rule: max clinical among IF >= 15% of instruct's dev IF
    floor = 0.15 * res["dev"]["references"]["instruct"]["if_score"]
    for method, chosen in res["chosen"].items():
        rows = [r for r in res["dev"]["rows"] if r["method"] == method]
        feasible = [r for r in rows if r["if_score"] >= floor - 1e-9]
        if feasible:
            best = max(feasible, key=lambda r: (r["clinical_score"], r["if_score"]))
            assert chosen["by"] == "rule" and chosen["feasible"] == len(feasible)
        else:
            best = max(rows, key=lambda r: r["if_score"])
            assert chosen["by"] == "objective"
        assert chosen["label"] == best["label"] and chosen["setting"] == best["setting"]
        assert [r["label"] for r in rows if r.get("chosen")] == [chosen["label"]]
    assert {c["by"] for c in res["chosen"].values()} == {"rule", "objective"}  # both ways of choosing, checked
    # held-out rows: the chosen settings and the references, on held-out documents only
    held = res["held_out"]["rows"]
    assert set(res["chosen"]) == set(TINY_METHODS)
    assert [r["label"] for r in held] == [c["label"] for c in res["chosen"].values()]
    for r in [*held, *res["held_out"]["references"].values()]:
        for task in ("tiny_follow", "tiny_clinic"):
            assert r["per_doc"][task]["doc_ids"] == split["held_out_ids"][task] and r["n_docs"][task] == 5
    for r in held:
        for key in ("if_retention", "clinical_gain_kept"):
            ci = r[f"{key}_ci"]
            assert ci["low"] <= r[f"{key}_pct"] + 1e-9 and r[f"{key}_pct"] <= ci["high"] + 1e-9
    for axis in res["differences"].values():
        assert axis["methods"][axis["best"]]["verdict"] == "best"
        for d in axis["methods"].values():
            if d["verdict"] not in ("best",):
                assert d["verdict"] == ("within noise" if d["low"] <= 0 <= d["high"] else "behind")
    left = {x["method"]: x["reason"] for x in res["left_out"]}
    assert left["sce"] == "not needed in this test" and "stacks" in left["passthrough"]
    assert set(left) == set(REGISTRY) - set(TINY_METHODS)
    md = (out / "methods_compared.md").read_text()
    assert "| linear | t=" in md and "- passthrough: stacks" in md and "On clinical gain kept, `" in md
    assert (out / "methods_compared.png").stat().st_size > 1000

    # the report has the section; a re-run resumes from the cache
    info = write_report(out)
    assert any(s.startswith("Merge methods compared") for s in info["sections"])
    assert "IF retained % [95% CI]" in (out / "report.md").read_text()
    again = CliRunner().invoke(app, ["compare-methods", str(config), str(out), "-q"])
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "methods_compared.json").read_text())
    assert rerun["evaluations"]["run"] == 0 and rerun["chosen"] == res["chosen"]


@pytest.mark.parametrize("overrides, words", [
    (["methods={linear: [{t: 0.5}], fuse: [{}]}"], "unknown merge method 'fuse'; available: arcee_fusion"),
    (["methods={linear: [{t: 0.2}, {t: 0.5}], ties: [{t: 0.5}]}"], "unequal budgets"),
    (["split.dev=8"], "task tiny_follow has 8 documents, which cannot hold more than split.dev (8)"),
])
def test_refusals_are_clear_errors_without_a_traceback(tiny_run, tmp_path, overrides, words, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DEBUG", raising=False)
    config, _, _ = tiny_run
    result = CliRunner().invoke(app, ["compare-methods", str(config), str(tmp_path / "run"), *overrides, "-q"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and words in out and "Traceback" not in out, out
    assert not (tmp_path / "run" / "methods_compared.json").exists()


def test_data_aware_methods_get_statistics_computed_from_the_calibration_mix(sweep_family, tmp_path):
    cfg = yaml.safe_load((sweep_family / "sweep.yaml").read_text())
    cfg.pop("grid")
    cal = tmp_path / "calibration.jsonl"
    cal.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "say hello", "response": "hello there"}, {"text": "the patient has a cough"},
        {"prompt": "list two", "response": "one two"}, {"text": "fever and pain"}]) + "\n")
    cfg.update({"methods": {"regmean": [{"t": 0.3}, {"t": 0.7}], "fisher": [{"t": 0.5}, {"t": 0.5, "normalize": False}]},
                "split": {"dev": 3, "seed": 5}, "replicates": 50, "left_out": {}})
    config = sweep_family / "compare_stats.yaml"  # beside the models its paths name
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    refused = CliRunner().invoke(app, ["compare-methods", str(config), str(out), "-q"])
    assert refused.exit_code != 0 and "calibration" in refused.output and "Traceback" not in refused.output
    cfg["calibration"] = {"data": [f"{cal}:3"], "max_length": 32}
    config.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["compare-methods", str(config), str(out), "-q"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "methods_compared.json").read_text())
    stats = {s["role"]: s for s in res["statistics"]}
    assert set(stats) == {"clinical", "instruct"} and all(s["examples"] == 3 for s in stats.values())
    for s in stats.values():  # each model's own statistics, of the recorded model
        record = json.loads((Path(s["folder"]) / "medmerge_stats.json").read_text())
        assert record["model"] == str(Path(res["models"][s["role"]]).resolve()) and record["kinds"] == ["fisher", "gram"]
    assert {r["method"] for r in res["held_out"]["rows"]} == {"regmean", "fisher"}
    assert len(res["dev"]["rows"]) == 4 and {r["label"] for r in res["dev"]["rows"]} == {
        "regmean t=0.3", "regmean t=0.7", "fisher t=0.5", "fisher normalize=False t=0.5"}  # statistics not in labels
    # another calibration mix: other folders (their names hash the inputs), never the old statistics
    cfg["calibration"]["max_length"] = 16
    config.write_text(yaml.safe_dump(cfg))
    again = CliRunner().invoke(app, ["compare-methods", str(config), str(out), "-q", "--force"])
    assert again.exit_code == 0, again.output
    res2 = json.loads((out / "methods_compared.json").read_text())
    assert {s["folder"] for s in res2["statistics"]}.isdisjoint({s["folder"] for s in res["statistics"]})
