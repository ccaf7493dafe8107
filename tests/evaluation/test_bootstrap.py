"""Paired bootstrap over evaluation documents: against the normal approximation, pairing, the per-doc filter."""

import math

import numpy as np
import pytest

from medmerge.errors import InputError
from medmerge.evaluation.bootstrap import (Bootstrap, Interval, difference_interval, per_doc_scores,
                                           relative_intervals, score_intervals, verdict)

IF = "t_if/prompt_level_strict_acc"
PARTS = ["t_mcq/acc", "t_gen/rougeL"]


def doc(values: dict, n: int) -> dict:
    return {task: {"doc_ids": list(range(n)), **metrics} for task, metrics in values.items()}


def test_mean_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.5).astype(float)
    boot = Bootstrap({"m": doc({"t_if": {"prompt_level_strict_acc": list(x)}}, 400)}, ["t_if"], replicates=4000, seed=3)
    iv = boot.interval(lambda r: r("m")["tasks"]["t_if"]["prompt_level_strict_acc"])
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / 400)  # hand formula
    assert iv.value == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - half, abs=0.006)
    assert iv.high == pytest.approx(x.mean() + half, abs=0.006)
    assert iv.replicates == 4000


def test_constant_scores_give_a_point_interval_and_the_same_seed_the_same_interval():
    m = doc({"t_if": {"prompt_level_strict_acc": [1.0] * 50}}, 50)
    a = Bootstrap({"m": m}, ["t_if"], seed=5).interval(lambda r: r("m")["tasks"]["t_if"]["prompt_level_strict_acc"])
    assert (a.low, a.high) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    m = doc({"t_if": {"prompt_level_strict_acc": list(rng.random(50))}}, 50)
    one = Bootstrap({"m": m}, ["t_if"], seed=5).interval(lambda r: r("m")["tasks"]["t_if"]["prompt_level_strict_acc"])
    two = Bootstrap({"m": m}, ["t_if"], seed=5).interval(lambda r: r("m")["tasks"]["t_if"]["prompt_level_strict_acc"])
    three = Bootstrap({"m": m}, ["t_if"], seed=6).interval(lambda r: r("m")["tasks"]["t_if"]["prompt_level_strict_acc"])
    assert one == two and one != three


def _models(n=200, flips=6, seed=0):
    rng = np.random.default_rng(seed)
    a_if = (rng.random(n) < 0.6).astype(float)
    b_if = a_if.copy()
    b_if[:flips] = 1 - b_if[:flips]  # b agrees with a on all but `flips` documents
    mcq = (rng.random(n) < 0.5).astype(float)
    gen = rng.random(n) * 100
    a = doc({"t_if": {"prompt_level_strict_acc": list(a_if)}, "t_mcq": {"acc": list(mcq)}, "t_gen": {"rougeL": list(gen)}}, n)
    b = doc({"t_if": {"prompt_level_strict_acc": list(b_if)}, "t_mcq": {"acc": list(mcq)}, "t_gen": {"rougeL": list(gen)}}, n)
    return a, b


def test_pairing_makes_a_difference_of_correlated_models_narrow():
    a, b = _models()
    boot = Bootstrap({"a": a, "b": b}, ["t_if", "t_mcq", "t_gen"], seed=0)
    paired = difference_interval(boot, "a", "b", "if_score", IF, PARTS)
    ia, ib = (score_intervals(boot, n, IF, PARTS)["if_score"] for n in ("a", "b"))
    unpaired_half = math.hypot(ia["high"] - ia["low"], ib["high"] - ib["low"]) / 2
    assert paired.value == pytest.approx(100 * (np.mean(a["t_if"]["prompt_level_strict_acc"])
                                                - np.mean(b["t_if"]["prompt_level_strict_acc"])))
    assert (paired.high - paired.low) / 2 < unpaired_half / 3
    same = difference_interval(boot, "a", "a", "clinical_score", IF, PARTS)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_composite_interval_uses_the_composite_formula():
    a, _ = _models()
    boot = Bootstrap({"a": a}, ["t_if", "t_mcq", "t_gen"], seed=0)
    s = score_intervals(boot, "a", IF, PARTS)
    expect = (100 * np.mean(a["t_mcq"]["acc"]) + np.mean(a["t_gen"]["rougeL"])) / 2
    assert s["clinical_score"]["value"] == pytest.approx(expect)
    assert s["clinical_score"]["low"] < expect < s["clinical_score"]["high"]


def test_relative_intervals_cover_the_point_values():
    n = 150
    rng = np.random.default_rng(2)
    def model(p_if, p_mcq, gen):
        return doc({"t_if": {"prompt_level_strict_acc": list((rng.random(n) < p_if) * 1.0)},
                    "t_mcq": {"acc": list((rng.random(n) < p_mcq) * 1.0)}, "t_gen": {"rougeL": [gen] * n}}, n)
    models = {"instruct": model(0.6, 0.3, 10), "clinical": model(0.0, 0.9, 50), "merge": model(0.55, 0.6, 30)}
    boot = Bootstrap(models, ["t_if", "t_mcq", "t_gen"], seed=0)
    rel = relative_intervals(boot, "merge", "instruct", "clinical", IF, PARTS)
    i, m = (np.mean(models[n]["t_if"]["prompt_level_strict_acc"]) for n in ("instruct", "merge"))
    assert rel["if_retention_pct"]["value"] == pytest.approx(100 * m / i)
    lo, hi = rel["if_retention_pct"]["low"], rel["if_retention_pct"]["high"]
    assert lo < 100 * m / i < hi
    g = rel["clinical_gain_kept_pct"]
    assert g["low"] < g["value"] < g["high"]


def test_different_documents_are_refused():
    a = doc({"t_if": {"prompt_level_strict_acc": [1.0, 0.0]}}, 2)
    b = {"t_if": {"doc_ids": [0, 5], "prompt_level_strict_acc": [1.0, 0.0]}}
    with pytest.raises(InputError, match="different documents of t_if"):
        Bootstrap({"a": a, "b": b}, ["t_if"])


def test_models_without_per_doc_values_get_no_interval():
    a, _ = _models()
    boot = Bootstrap({"a": a, "old": {}}, ["t_if", "t_mcq", "t_gen"])
    assert difference_interval(boot, "a", "old", "if_score", IF, PARTS) is None
    assert score_intervals(boot, "old", IF, PARTS) == {"if_score": None, "clinical_score": None}


def test_verdicts():
    assert verdict(Interval(0.5, -0.8, 2.0, 100), 1.0) == "holds"
    assert verdict(Interval(-5.0, -7.0, -3.0, 100), 1.0) == "does not hold"
    assert verdict(Interval(-1.0, -4.0, 2.0, 100), 1.0) == "cannot tell at this sample size"
    assert verdict(None, 1.0).startswith("cannot tell")


def test_per_doc_keeps_only_metrics_whose_mean_is_the_reported_value():
    samples = {"t_gen": [
        {"doc_id": 1, "filter": "none", "metrics": ["rougeL", "bleu", "ids"], "rougeL": 40.0,
         "bleu": ("a b c", "a b d"), "ids": [1, 2]},
        {"doc_id": 0, "filter": "none", "metrics": ["rougeL", "bleu", "ids"], "rougeL": 20.0,
         "bleu": ("x y", "x y"), "ids": [3]},
    ]}
    out = per_doc_scores(samples, {"t_gen": {"rougeL": 30.0, "bleu": 12.0}})
    assert out == {"t_gen": {"doc_ids": [0, 1], "rougeL": [20.0, 40.0]}}  # sorted by doc; corpus BLEU and lists dropped
    assert per_doc_scores(samples, {"t_gen": {"rougeL": 31.0}}) == {}  # not a per-doc mean: no interval
