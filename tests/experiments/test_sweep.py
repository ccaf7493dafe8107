"""`medmerge sweep`: in-memory points, the result cache, resuming, Pareto/selection, halving, optuna workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats as scipy_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import medmerge.evaluation.runner as runner  # noqa: E402
from medmerge.errors import ConfigError  # noqa: E402
from medmerge.experiments.sweep.points import Point, Roles, build_config, expand_grid  # noqa: E402
from medmerge.experiments.sweep.points import with_paths  # noqa: E402
from medmerge.experiments.sweep.run import run  # noqa: E402
from medmerge.experiments.sweep.select import best_under_constraint, kendall_tau, pareto_front, spearman  # noqa: E402


@pytest.fixture
def family(sweep_family) -> Path:
    return sweep_family


@pytest.fixture
def counted(monkeypatch):
    """Count the harness calls (and the tasks in each) that a sweep makes."""
    calls = []
    real = runner.evaluate

    def counting(model, tasks, *args, **kwargs):
        calls.append(list(tasks))
        return real(model, tasks, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", counting)
    return calls


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


def test_grid_is_cached_extended_and_rerun_without_recomputing(family, tmp_path, counted):
    out = tmp_path / "run"
    first = run(family / "sweep.yaml", out, progress=False)
    assert first["points"] == 3
    assert first["evaluations"] == {**first["evaluations"], "run": 10, "cached": 0}  # (2 refs + 3 points) x 2 tasks
    assert len(counted) == 5
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["instruct", "clinical", "linear t=0", "linear t=0.5", "linear t=1"]
    for r in rows:
        assert set(r["tasks"]) == {"tiny_follow", "tiny_clinic"} and r["if_score"] is not None
    # the endpoints of the interpolation are the references themselves
    # mergeability: how far each model moved from the base, and the cosine of the moves
    tv = first["task_vectors"]
    assert set(tv["models"]) == {"instruct", "clinical"} and tv["models"]["instruct"]["all"]["relative_norm"] > 0
    assert -1 <= tv["cosines"][0]["all"] <= 1 and "Mergeability" in (out / "sweep.md").read_text()
    assert rows[2]["tasks"] == rows[0]["tasks"] and rows[4]["tasks"] == rows[1]["tasks"]
    # paired bootstrap intervals of the retention columns, from the per-document values kept with each row
    for r in rows[2:]:
        assert len(r["per_doc"]["tiny_follow"]["doc_ids"]) == r["n_docs"]["tiny_follow"]
        ci = r["if_retention_ci"]
        if r["if_retention_pct"] is not None:
            assert ci["value"] == pytest.approx(r["if_retention_pct"]) and ci["low"] <= ci["value"] + 1e-9 <= ci["high"] + 2e-9
    assert rows[2]["if_retention_ci"]["low"] == rows[2]["if_retention_ci"]["high"] == pytest.approx(100)  # t=0: instruct
    assert "[95% CI]" in (out / "sweep.md").read_text()

    counted.clear()
    again = run(family / "sweep.yaml", out, progress=False)
    assert again["evaluations"]["run"] == 0 and again["evaluations"]["cached"] == 10 and counted == []
    assert [r["tasks"] for r in _rows(out)] == [r["tasks"] for r in rows]

    wider = run(family / "sweep.yaml", out, overrides=["grid=[{method: linear, t: [0.0, 0.25, 0.5, 1.0]}]"],
                progress=False)
    assert wider["evaluations"]["run"] == 2 and wider["evaluations"]["cached"] == 10  # only t=0.25 is new
    assert len(counted) == 1

    # a changed evaluation setting is a different cache entry
    counted.clear()
    run(family / "sweep.yaml", out, overrides=["eval.limit=4"], progress=False)
    assert len(counted) == 5


def test_interrupted_sweep_resumes_where_it_stopped(family, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = runner.evaluate
    calls = []

    def dies_on_the_fourth(model, tasks, *args, **kwargs):
        calls.append(tasks)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, tasks, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(family / "sweep.yaml", out, progress=False)
    assert len(list((out / "cache").glob("*.json"))) == 6  # 3 points x 2 tasks finished before the interruption
    monkeypatch.setattr(runner, "evaluate", real)
    summary = run(family / "sweep.yaml", out, progress=False)
    assert summary["evaluations"]["cached"] == 6 and summary["evaluations"]["run"] == 4


def test_in_memory_point_equals_the_on_disk_merge(family, tmp_path):
    from safetensors.torch import load_file

    from medmerge.merging import merge
    from medmerge.experiments.sweep.config import load_config
    from medmerge.experiments.sweep.run import open_evaluator

    cfg, _ = load_config(family / "sweep.yaml", tmp_path)
    ev = open_evaluator(cfg, tmp_path)
    models = {r: family / r for r in ("base", "clinical", "instruct")}
    for point in (Point("linear", {"t": 0.3}), Point("slerp", {"t": [0.2, 0.8]}),
                  Point("ties", {"t": 0.6, "density": 0.5}), Point("dare_ties", {"t": 0.4, "density": 0.7}),
                  Point("task_arithmetic", {"t": 0.5, "lambda": 1.2})):
        config = ev.config_of(point)
        ev.write_state(config)
        disk = tmp_path / point.describe().replace(" ", "_")
        merge(with_paths(config, models), disk, progress=False)
        written = {}
        for f in disk.glob("*.safetensors"):
            written.update(load_file(str(f)))
        state = ev.model.state_dict()
        assert set(written) <= set(state)
        for name, tensor in written.items():
            assert torch.equal(state[name], tensor), (point.describe(), name)


def test_point_configs_follow_each_method():
    roles = Roles()
    assert build_config("linear", {"t": 0.3}, roles)["models"] == [
        {"model": "clinical", "parameters": {"weight": 0.3}}, {"model": "instruct", "parameters": {"weight": 0.7}}]
    slerp = build_config("slerp", {"t": [0.2, 0.8]}, roles)
    assert slerp["base_model"] == "instruct" and slerp["parameters"] == {"t": [0.2, 0.8]}
    ties = build_config("ties", {"t": 0.6, "density": 0.5, "lambda": 1.1}, roles)
    assert ties["base_model"] == "base" and ties["parameters"] == {"lambda": 1.1}
    assert ties["models"][1]["parameters"] == {"weight": 0.4, "density": 0.5}
    with pytest.raises(ConfigError, match="no parameter 'densty'"):
        build_config("ties", {"t": 0.5, "densty": 0.5}, roles)
    with pytest.raises(ConfigError, match="needs t"):
        build_config("linear", {}, roles)
    pts = expand_grid([{"method": "ties", "t": [0.1, 0.2], "density": [0.5, 0.7]},
                       {"method": "ties", "t": [0.1], "density": [0.5]},  # a repeat: dropped
                       {"method": "slerp", "t": [[0.0, 1.0]]}])
    assert [p.describe() for p in pts] == ["ties t=0.1 density=0.5", "ties t=0.1 density=0.7",
                                            "ties t=0.2 density=0.5", "ties t=0.2 density=0.7", "slerp t=[0,1]"]


def test_pareto_front_and_constrained_best_on_hand_made_points():
    pts = [(10, 1), (8, 5), (8, 5), (5, 9), (4, 4), (1, 10), (9, 0.5), (None, 20), (5, 9)]
    # (4,4) is dominated by (8,5); (9,0.5) by (10,1); the None point never counts; duplicates both stay
    assert pareto_front(pts) == [0, 1, 2, 3, 8, 5]
    assert pareto_front([]) == []
    rows = [{"if_score": a, "clinical_score": b} for a, b in [(30, 20), (29, 25), (20, 40), (28.5, 25)]]
    best = best_under_constraint(rows, if_reference=30, if_retention_min=95, maximize="clinical_score")
    assert best["index"] == 1 and best["threshold"] == pytest.approx(28.5) and best["feasible"] == 3
    assert best_under_constraint(rows, if_reference=30, if_retention_min=None, maximize="clinical_score")["index"] == 2
    assert best_under_constraint(rows, if_reference=100, if_retention_min=95, maximize="clinical_score") is None


def test_scores_against_t_keep_each_setting_on_its_own_curve():
    from medmerge.experiments.plots import vs_t_series

    def row(method, params, if_score, clinical, **extra):
        return {"kind": "grid", "method": method, "params": params, "if_score": if_score, "clinical_score": clinical,
                **extra}

    rows = [{"kind": "reference", "method": None, "params": {}, "if_score": 70, "clinical_score": 19},
            row("task_arithmetic", {"t": 0.4, "lambda": 1.8}, 53, 34), row("task_arithmetic", {"t": 0.3, "lambda": 1.0}, 9, 29),
            row("task_arithmetic", {"t": 0.35, "lambda": 1.8}, 67, 33), row("task_arithmetic", {"t": 0.4, "lambda": 1.0}, 4, 31),
            row("linear", {"t": [0.2, 0.8]}, 1, 1),  # a per-layer gradient has no single t
            row("linear", {"t": 0.5}, 2, 2, stopped_at_rung=0), row("linear", {"t": 0.1}, 45, 23)]
    # two lambdas are two curves, never one line through the best of each t (which mixed merges)
    assert vs_t_series(rows) == {("linear", ""): [(0.1, 45, 23)],
                                 ("task_arithmetic", "lambda=1"): [(0.3, 9, 29), (0.4, 4, 31)],
                                 ("task_arithmetic", "lambda=1.8"): [(0.35, 67, 33), (0.4, 53, 34)]}


def test_rank_agreement_matches_scipy():
    x = [0.1, 0.4, 0.4, 0.9, 0.3, 0.7]
    y = [1.0, 3.0, 2.0, 5.0, 2.0, 4.0]
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert kendall_tau([1, 1], [2, 3]) is None


def test_successive_halving_promotes_and_reports_agreement(family, tmp_path):
    cfg = yaml.safe_load((family / "sweep.yaml").read_text())
    cfg["grid"] = [{"method": "linear", "t": [0.0, 0.25, 0.5, 0.75, 1.0]}]
    cfg["halving"] = {"rungs": [0.5, 1.0], "keep": 0.4, "check": True}
    (family / "halving.yaml").write_text(yaml.safe_dump(cfg))
    summary = run(family / "halving.yaml", tmp_path / "run", progress=False)
    h = summary["halving"]
    assert [r["candidates"] for r in h["rungs"]] == [5, 2]
    assert h["rungs"][0]["docs"] == {"tiny_follow": 4, "tiny_clinic": 4}
    assert h["rungs"][1]["docs"] == {"tiny_follow": 8, "tiny_clinic": 8}
    rows = [r for r in _rows(tmp_path / "run") if r["kind"] == "grid"]
    assert sum(1 for r in rows if not r.get("check_only")) == 2  # promoted to the full set
    assert all(r["n_docs"] == {"tiny_follow": 8, "tiny_clinic": 8} for r in rows)  # check: every one on all docs
    a = h["agreement"]
    assert a["pairs"] == 5 and -1 <= a["kendall_tau"] <= 1 and "top1_agrees" in a


def test_bad_sweep_configs_are_refused(family, tmp_path):
    with pytest.raises(ConfigError, match="roles: 'clinical' is not in models"):
        run(family / "sweep.yaml", tmp_path / "a", overrides=["models={base: base, instruct: instruct}",
                                                              "references=[instruct]"], progress=False)
    with pytest.raises(ConfigError, match="rungs must increase"):
        run(family / "sweep.yaml", tmp_path / "b", overrides=["halving={rungs: [0.5, 0.25]}"], progress=False)
    with pytest.raises(ConfigError, match="task tiny_x is not in eval.tasks"):
        run(family / "sweep.yaml", tmp_path / "c", overrides=["scores.if_metric=tiny_x/rouge1"], progress=False)


def test_export_best_writes_the_selected_merge(family, tmp_path):
    from safetensors.torch import load_file

    from medmerge.merging import verify

    summary = run(family / "sweep.yaml", tmp_path / "run", export_best=tmp_path / "best", progress=False)
    assert summary["exported"]["verified"] and verify(tmp_path / "best").ok
    assert summary["best"]["id"] in summary["pareto"]
    with pytest.raises(Exception, match="exists"):
        run(family / "sweep.yaml", tmp_path / "run", export_best=tmp_path / "best", progress=False)
    assert load_file(str(next((tmp_path / "best").glob("*.safetensors"))))


def test_optuna_search_with_two_workers_on_one_sqlite_study(family, tmp_path):
    import optuna

    cfg = yaml.safe_load((family / "sweep.yaml").read_text())
    cfg["grid"] = []
    cfg["search"] = {"sampler": "random", "methods": ["ties"], "space": {"t": [0.0, 1.0], "density": [0.3, 1.0]},
                     "layer_groups": 2, "study": "two-workers"}
    cfg["eval"]["limit"] = 2
    (family / "search.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "study.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medmerge.cli", "sweep", str(family / "search.yaml"), "--search", "optuna",
           "--trials", "6", "--storage", f"sqlite:///{db}", "-q"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"w{k}"), "--worker", str(k)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="two-workers", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert len({t.number for t in complete}) == 6
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 6  # no duplicate points
    assert {t.user_attrs["row"]["worker"] for t in complete} == {0, 1}  # both workers contributed
    for t in complete:
        row = t.user_attrs["row"]
        assert isinstance(row["params"]["t"], list) and len(row["params"]["t"]) == 2  # per-layer-group t
        assert t.values == [row["if_score"], row["clinical_score"]]
    rows = [r for k in (0, 1) for r in _rows(tmp_path / f"w{k}") if r["kind"] == "search"]
    assert len({r["trial"] for r in rows}) == 6


# --- the whole config is checked before anything is evaluated (fast: no world, no harness) -------------------------

@pytest.fixture
def sweep_file(llama_family, tmp_path, monkeypatch):
    """Write a sweep config over the tiny llama family with `changes`; opening the evaluator fails the test."""
    import medmerge.experiments.sweep.run as sweep_run

    def no_evaluator(*args, **kwargs):
        raise AssertionError("the evaluator was opened (references about to be scored) before the config was checked")

    monkeypatch.setattr(sweep_run, "open_evaluator", no_evaluator)

    def write(**changes) -> Path:
        cfg = {"models": {"base": str(llama_family["base"]), "clinical": str(llama_family["a"]),
                          "instruct": str(llama_family["b"])},
               "references": ["instruct", "clinical"], "grid": [{"method": "linear", "t": [0.0, 0.5, 1.0]}],
               "eval": {"tasks": ["mm_pubmedqa"]}, "device": "cpu"}
        cfg.update(changes)
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.mark.parametrize("grid, match", [
    ([{"method": "tiess", "t": [0.5]}], r"unknown merge method 'tiess'"),
    ([{"method": "slerp", "t": [0.5, 1.7]}], r"slerp t=1.7: 1.7 is outside \[0, 1\].*allow_extrapolation: true"),
    ([{"method": "linear", "t": [1.7]}], r"linear t=1.7: 1.7 is outside \[0, 1\]: t is the domain model's share"),
    ([{"method": "slerp", "t": [[0.2, 1.2]]}], r"1.2 is outside \[0, 1\]"),
    ([{"method": "ties", "t": [0.5], "density": [0.5, -0.3]}], r"'density' for model .*: -0.3 is outside \(0, 1\]"),
    ([{"method": "della", "t": [0.5], "density": [0.9]}], r"density 0.9 \+/- epsilon 0.15 must lie in \(0, 1\)"),
    ([{"method": "linear", "t": ["half"]}], r"'half' is not a number"),
    ([{"method": "ties", "t": 0.5, "density": "0.5"}], r"density='0.5': '0.5' is not a number"),
    ([{"method": "linear", "t": []}], r"grid\[0\].t is an empty list"),
    ([{"config": {"merge_method": "linear", "models": [{"model": "clinicl", "parameters": {"weight": 1.0}}]}}],
     r"names model 'clinicl', which is not one of the sweep's models"),
])
def test_bad_grid_is_refused_before_any_reference_is_scored(sweep_file, tmp_path, grid, match):
    with pytest.raises(ConfigError, match=match):
        run(sweep_file(grid=grid), tmp_path / "run", progress=False)


@pytest.mark.parametrize("search, match", [
    ({"methods": ["tiess"]}, r"unknown merge method 'tiess'"),
    ({"methods": ["ties"], "space": {"t": [0.0, 1.0], "density": [0.0, 1.0]}}, r"'density' .* 0.0 is outside \(0, 1\]"),
    ({"methods": ["slerp"], "space": {"t": [0.0, 1.5]}}, r"1.5 is outside \[0, 1\]"),
])
def test_bad_search_space_is_refused_before_any_reference_is_scored(sweep_file, tmp_path, search, match):
    with pytest.raises(ConfigError, match=match):
        run(sweep_file(grid=[], search=search), tmp_path / "run", progress=False, search="optuna")


def test_extrapolation_is_an_explicit_choice(sweep_file, tmp_path):
    # allowed: the check passes and the run goes on to open the evaluator
    with pytest.raises(AssertionError, match="evaluator was opened"):
        run(sweep_file(grid=[{"method": "slerp", "t": [1.5], "allow_extrapolation": True}]), tmp_path / "run",
            progress=False)
    cfg = build_config("slerp", {"t": 1.5, "allow_extrapolation": True}, Roles())
    assert cfg["parameters"] == {"t": 1.5, "allow_extrapolation": True}


@pytest.mark.parametrize("changes, match", [
    ({"models": {"base": "b", "clinical": "c", "instruct": "i", "a/b": "x"}}, r"model name \(a key of models:\) 'a/b' cannot be used as a folder name"),
    ({"grid": [{"config": {"merge_method": "linear", "models": [{"model": "clinical", "parameters": {"weight": 1.0}}]},
                "label": "../up"}]}, r"grid\[0\].label '../up' cannot be used as a folder name"),
    ({"search": {"study": "../study"}}, r"search.study '../study' cannot be used as a folder name"),
])
def test_names_that_become_paths_are_checked_at_parse_time(sweep_file, tmp_path, changes, match):
    from medmerge.experiments.sweep.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(sweep_file(**changes), tmp_path)


def test_point_values_are_numbers():
    with pytest.raises(ConfigError, match=r"'half' is not a number"):
        build_config("linear", {"t": "half"}, Roles())
    with pytest.raises(ConfigError, match=r"normalize='yes' is not true or false"):
        build_config("ties", {"t": 0.5, "normalize": "yes"}, Roles())
