"""Parameter domains: every method's parameters are checked at plan time, before any tensor is read."""

from __future__ import annotations

import math

import pytest

import medmerge
from medmerge.errors import ConfigError
from medmerge.merging import methods
from medmerge.merging.methods.base import Domain


def _ties(f, density_a, **top):
    cfg = {"merge_method": "ties", "base_model": str(f["base"]), "models": [
        {"model": str(f["a"]), "parameters": {"weight": 0.5, "density": density_a}},
        {"model": str(f["b"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    if top:
        cfg["parameters"] = top
    return cfg


def _slerp(f, **params):
    return {"merge_method": "slerp", "base_model": str(f["base"]), "parameters": params,
            "models": [{"model": str(f["base"])}, {"model": str(f["a"])}]}


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read: the checks must come from the config and headers alone."""
    from medmerge.io.checkpoint import Checkpoint

    def refuse(self, name, rows=None):
        raise AssertionError(f"tensor {name} was read before the parameters were checked")

    monkeypatch.setattr(Checkpoint, "read", refuse)


@pytest.mark.parametrize("density", [-0.3, 0.0, 1.7, float("nan")])
def test_density_outside_0_1_is_refused_at_plan_time(llama_family, tmp_path, no_reads, density):
    with pytest.raises(ConfigError, match=r"parameter 'density' for model .*a.*: .* is outside \(0, 1\]"):
        medmerge.merge(_ties(llama_family, density), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("t", [1.7, -0.1, [0.0, 1.2]])
def test_slerp_t_outside_0_1_needs_allow_extrapolation(llama_family, tmp_path, no_reads, t):
    with pytest.raises(ConfigError, match=r"parameter 't' .* outside \[0, 1\].*allow_extrapolation: true"):
        medmerge.load_plan(_slerp(llama_family, t=t))


def test_slerp_extrapolation_when_asked(llama_family):
    plan = medmerge.load_plan(_slerp(llama_family, t=1.5, allow_extrapolation=True))
    assert {tp.global_params["t"] for tp in plan.tensors} == {1.5}
    with pytest.raises(ConfigError, match=r"parameter 't'.* must be finite"):
        medmerge.load_plan(_slerp(llama_family, t=float("inf"), allow_extrapolation=True))


def test_nuslerp_weights_that_extrapolate_are_refused(llama_family, no_reads):
    cfg = {"merge_method": "nuslerp", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 1.7}},
        {"model": str(llama_family["b"]), "parameters": {"weight": -0.7}}]}
    with pytest.raises(ConfigError, match=r"nuslerp: .*t = w_2 / \(w_1 \+ w_2\) = -0.7.* outside \[0, 1\]"):
        medmerge.load_plan(cfg)
    cfg["parameters"] = {"allow_extrapolation": True}
    medmerge.load_plan(cfg)


@pytest.mark.parametrize("params, match", [
    ({"lambda": float("inf")}, r"'lambda' .* must be finite"),
    ({"normalize": "maybe"}, r"'normalize' .* expected bool"),
])
def test_global_task_vector_parameters(llama_family, no_reads, params, match):
    with pytest.raises(ConfigError, match=match):
        medmerge.load_plan(_ties(llama_family, 0.5, **params))


def test_weights_must_be_finite(llama_family, no_reads):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": float("nan")}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"parameter 'weight' for model .*a.*: nan .*must be finite"):
        medmerge.load_plan(cfg)


@pytest.mark.parametrize("weights", [(1e-45, 1e-45), (1e-40, 1.0), (1e-31, 1e-31)])
def test_linear_weights_too_small_for_float32_are_refused_with_normalize(llama_family, no_reads, weights):
    """M07: weights 1e-45, 1e-45 underflow in float32 (the output was not (a + b) / 2) -> refused at plan time."""
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": weights[0]}},
        {"model": str(llama_family["b"]), "parameters": {"weight": weights[1]}}]}
    with pytest.raises(ConfigError, match=r"linear: the weight .* of model .* is too small to compute with in "
                                          r"float32 .* only their ratios matter"):
        medmerge.load_plan(cfg)
    cfg["parameters"] = {"normalize": False}  # a tiny weight without normalize is a tiny (but exact) scale
    medmerge.load_plan(cfg)
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 1e-20}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 0.0}}]}
    medmerge.load_plan(cfg)  # small but representable: unchanged


def test_breadcrumbs_gamma_and_della_epsilon(llama_family, no_reads):
    f = llama_family
    cfg = {**_ties(f, 0.5), "merge_method": "breadcrumbs"}
    cfg["models"][0]["parameters"]["gamma"] = 1.0
    with pytest.raises(ConfigError, match=r"'gamma' .* outside \[0, 1\)"):
        medmerge.load_plan(cfg)
    cfg = {**_ties(f, 0.9), "merge_method": "della"}
    cfg["models"][0]["parameters"]["epsilon"] = -0.1
    with pytest.raises(ConfigError, match=r"'epsilon' .* outside \[0, 0.5\)"):
        medmerge.load_plan(cfg)
    cfg["models"][0]["parameters"]["epsilon"] = 0.15  # 0.9 + 0.15 >= 1: found at plan time, not mid-merge
    with pytest.raises(ConfigError, match=r"della: model .*a.*density 0.9 \+/- epsilon 0.15 .* \(0, 1\)"):
        medmerge.load_plan(cfg)


def test_gradient_and_filtered_values_are_checked_too(llama_family, no_reads):
    cfg = _ties(llama_family, [{"filter": "mlp", "value": [0.5, 1.3]}, {"value": 0.5}])
    with pytest.raises(ConfigError, match=r"'density' .* 1.3 is outside \(0, 1\]"):
        medmerge.load_plan(cfg)


def test_filter_that_matches_no_tensor_is_named(llama_family, tmp_path, no_reads):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": [{"filter": "mlpx", "value": 0.3}, {"value": 0.5}]}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"filter 'mlpx' .*matches no tensor"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    cfg["models"][0]["parameters"]["weight"][0]["filter"] = "mlp"
    medmerge.load_plan(cfg)


def test_every_float_parameter_has_a_domain_and_describe_shows_it():
    for name, method in methods.REGISTRY.items():
        for p in method.spec.params:
            if p.type in (float, int):
                assert isinstance(p.domain, Domain), (name, p.name)
    rows = {name: params for name, _, params, _ in methods.describe()}
    memory = {name: m for name, _, _, m in methods.describe()}
    assert len(rows) == len(methods.REGISTRY) and all(memory.values())  # every method says what one tensor costs
    assert memory["linear"].startswith("streamed by rows") and memory["karcher"].startswith("whole tensor")
    assert "select_topk=1.0 in [0, 1]" in rows["sce"] and "t in [0, inf)" in rows["nearswap"]
    assert "density=1.0 in (0, 1]" in rows["ties"]
    assert "t in [0, 1] unless allow_extrapolation" in rows["slerp"]
    assert "epsilon=0.15 in [0, 0.5)" in rows["della"]
    assert "weight finite" in rows["linear"]


def test_domain_text_and_membership():
    d = Domain(0, 1, low_open=True)
    assert str(d) == "(0, 1]" and 1 in d and 0.5 in d and 0 not in d
    assert not d.__contains__(math.nan)
    assert str(Domain()) == "finite" and math.inf not in Domain() and -3 in Domain() and "x" not in Domain()
    assert str(Domain(0)) == "[0, inf)"


@pytest.mark.parametrize("seed", [True, 1.5])
def test_random_seed_is_a_whole_number(seed):
    with pytest.raises(ConfigError, match="random_seed"):
        medmerge.parse_config({"merge_method": "linear", "models": [{"model": "a"}], "random_seed": seed})


def test_docs_methods_md_lists_what_the_specs_declare():
    from pathlib import Path

    from medmerge.merging.methods import markdown

    doc = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    assert doc[doc.index("## Methods\n"):] == markdown() + "\n", (
        "docs/methods.md is out of date: regenerate its Methods section from medmerge.merging.methods.markdown()")
