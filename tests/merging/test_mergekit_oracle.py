"""medmerge against mergekit 0.1.5 as an oracle: same YAML, same tiny float32 models on disk.

Each method runs once through mergekit's Python API (`run_merge`, in-process, offline) and
once through `medmerge.merge`; every output tensor must agree to 1e-6 (bit for bit for
`linear`). mergekit is a test-only dependency: without it this module is skipped.

The random methods (dare_*, della*) draw their masks from torch's global RNG in mergekit
and from per-tensor seeded generators in medmerge, so their masks cannot coincide; they
are compared on the deterministic path (density 1.0, where nothing is dropped and only
the weighting, sign consensus, normalization and lambda are exercised). Their random
masks are checked against hand computations in test_methods_formula.py instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

TOL = 1e-6

# Per-tensor filters and gradients used across the configs below (two layers: a gradient
# gives its first value to layer 0 and to the non-layer tensors, its last to layer 1).
MLP_FIRST = [{"filter": "mlp", "value": [0.9, 0.2]}, {"value": 0.4}]


def _m(ref, **params):
    entry = {"model": ref}
    if params:
        entry["parameters"] = params
    return entry


def _cfgs(f: dict) -> dict[str, dict]:
    """Configs by test id; `f` maps a, b, c, base to model folders (as strings)."""
    a, b, c, base = f["a"], f["b"], f["c"], f["base"]
    return {
        # linear: plain 3-way, gradients + filters, unnormalized
        "linear": {"merge_method": "linear", "models": [
            _m(a, weight=0.5), _m(b, weight=0.3), _m(c, weight=0.2)]},
        "linear-gradient-filter": {"merge_method": "linear", "models": [
            _m(a, weight=[0.1, 0.9]), _m(b, weight=MLP_FIRST), _m(c, weight=[1.0, 0.5, 0.0])]},
        "linear-unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
            _m(a, weight=0.7), _m(b, weight=[0.6, -0.2])]},
        # slerp: base listed in models, t a gradient; t per filter
        "slerp": {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.35},
                  "models": [_m(base), _m(a)]},
        "slerp-gradient-filter": {"merge_method": "slerp", "base_model": base, "parameters": {
            "t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [0.8, 0.3]},
                  {"value": 0.6}]}, "models": [_m(a), _m(base)]},
        # nuslerp: without base, with base, per-row
        "nuslerp": {"merge_method": "nuslerp", "models": [_m(a, weight=1.0), _m(b, weight=[3.0, 0.5])]},
        "nuslerp-base": {"merge_method": "nuslerp", "base_model": base,
                         "models": [_m(a, weight=0.4), _m(b, weight=MLP_FIRST)]},
        "nuslerp-rowwise": {"merge_method": "nuslerp", "base_model": base,
                            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                            "models": [_m(a, weight=1.0), _m(b, weight=2.0)]},
        "nuslerp-lastdim": {"merge_method": "nuslerp",
                            "parameters": {"nuslerp_flatten": False},
                            "models": [_m(a, weight=1.0), _m(b, weight=2.0)]},
        # task vector family, 3 models + base
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "parameters": {"lambda": [0.8, 1.3]},
                            "models": [_m(a, weight=0.5), _m(b, weight=[0.2, 0.9]), _m(c, weight=MLP_FIRST)]},
        "task_arithmetic-normalize": {"merge_method": "task_arithmetic", "base_model": base,
                                      "parameters": {"normalize": True},
                                      "models": [_m(a, weight=0.5), _m(b, weight=0.25), _m(c, weight=1.0)]},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [_m(a, weight=0.5, density=0.5), _m(b, weight=[0.2, 0.9], density=0.7),
                            _m(c, weight=0.3, density=[{"filter": "mlp", "value": 0.2}, {"value": [0.4, 0.9]}])]},
        "ties-unnormalized-lambda": {"merge_method": "ties", "base_model": base,
                                     "parameters": {"normalize": False, "lambda": 1.5, "density": 0.3},
                                     "models": [_m(a, weight=1.0), _m(b, weight=-0.5), _m(c, weight=0.7)]},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "random_seed": 7,
                        "parameters": {"density": 1.0},
                        "models": [_m(a, weight=0.6), _m(b, weight=[0.1, 0.7]), _m(c, weight=MLP_FIRST)]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "random_seed": 7,
                      "parameters": {"density": 1.0, "lambda": [1.0, 0.5]},
                      "models": [_m(a, weight=0.6), _m(b, weight=[0.1, 0.7]), _m(c, weight=0.5)]},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base,
                        "models": [_m(a, weight=0.5, density=0.8, gamma=0.05),
                                   _m(b, weight=[0.3, 0.6], density=[0.6, 0.9], gamma=0.1),
                                   _m(c, weight=0.4, density=MLP_FIRST)]},
        "breadcrumbs-rescale": {"merge_method": "breadcrumbs", "base_model": base,
                                "parameters": {"rescale": True, "density": 0.7, "gamma": 0.02},
                                "models": [_m(a, weight=1.0), _m(b, weight=0.5)]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "parameters": {"density": 0.7, "gamma": [0.01, 0.1]},
                             "models": [_m(a, weight=0.5), _m(b, weight=0.8), _m(c, weight=[0.2, 0.6])]},
        "della": {"merge_method": "della", "base_model": base, "random_seed": 3,
                  "parameters": {"density": 1.0, "epsilon": 0.1},
                  "models": [_m(a, weight=0.5), _m(b, weight=[0.2, 0.9]), _m(c, weight=MLP_FIRST)]},
        "della_linear": {"merge_method": "della_linear", "base_model": base, "random_seed": 3,
                         "parameters": {"density": 1.0, "epsilon": 0.1, "lambda": 1.2},
                         "models": [_m(a, weight=0.5), _m(b, weight=[0.2, 0.9]), _m(c, weight=0.3)]},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [_m(a), _m(b), _m(c)]},
        "model_stock-filter_wise": {"merge_method": "model_stock", "base_model": base,
                                    "parameters": {"filter_wise": True}, "models": [_m(a), _m(b), _m(c)]},
        # issue 19's seven: hyperspherical means, consensus-weighted task vectors, selective swaps
        "multislerp": {"merge_method": "multislerp",
                       "models": [_m(a, weight=0.5), _m(b, weight=[0.2, 0.9]), _m(c, weight=MLP_FIRST)]},
        "multislerp-base": {"merge_method": "multislerp", "base_model": base,
                            "parameters": {"normalize_weights": False, "eps": 1e-6},
                            "models": [_m(a, weight=0.6), _m(b, weight=0.3), _m(c, weight=[0.1, 0.4])]},
        "karcher": {"merge_method": "karcher", "models": [_m(a), _m(b), _m(c)]},
        "karcher-base-params": {"merge_method": "karcher", "base_model": base,
                                "parameters": {"max_iter": [3, 20], "tol": 1e-7}, "models": [_m(a), _m(b)]},
        "sce": {"merge_method": "sce", "base_model": base, "models": [_m(a), _m(b), _m(c)]},
        "sce-topk": {"merge_method": "sce", "base_model": base,
                     "parameters": {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": [0.5, 0.9]}]},
                     "models": [_m(a), _m(b), _m(c)]},
        "ram": {"merge_method": "ram", "base_model": base, "parameters": {"epsilon": 0.04},
                "models": [_m(a), _m(b), _m(c)]},
        "ram-default": {"merge_method": "ram", "base_model": base, "models": [_m(a), _m(b)]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base,
                       "parameters": {"epsilon": 0.04, "r": 0.5, "alpha": [0.3, 0.8]},
                       "models": [_m(a), _m(b), _m(c)]},
        "ramplus_tl-default": {"merge_method": "ramplus_tl", "base_model": base, "models": [_m(a), _m(b), _m(c)]},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "parameters": {"t": [0.01, 0.05]},
                     "models": [_m(base), _m(a)]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [_m(base), _m(a)]},
        "passthrough": {"merge_method": "passthrough", "models": [_m(a)]},
        "passthrough-scale": {"merge_method": "passthrough",
                              "models": [_m(a, scale=[{"filter": "norm", "value": 0.0}, {"value": [2.0, -0.5]}])]},
    }


CASES = list(_cfgs({k: k for k in ("a", "b", "c", "base")}))
MERGEKIT_METHODS = {"linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
                    "multislerp", "karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors written in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu",
                           random_seed=cfg.get("random_seed"))
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    return _load(out)


def _run_medmerge(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    result = medmerge.merge(cfg, out, progress=False, verify=False)
    assert result.out == out
    return _load(out)


def _with_dtype(cfg: dict) -> dict:
    return {**cfg, "dtype": "float32"}


def _compare(mk: dict, mm: dict, exact: bool) -> None:
    assert sorted(mm) == sorted(mk), f"tensor names differ: {sorted(set(mm) ^ set(mk))}"
    worst = (0.0, "")
    for name in sorted(mk):
        a, b = mk[name], mm[name]
        assert b.dtype == a.dtype == torch.float32, (name, a.dtype, b.dtype)
        assert b.shape == a.shape, (name, a.shape, b.shape)
        diff = (a.double() - b.double()).abs().max().item()
        if exact:
            assert torch.equal(a, b), f"{name}: linear must match mergekit bit for bit (max diff {diff:.3g})"
        worst = max(worst, (diff, name))
    assert worst[0] <= TOL, f"largest abs difference {worst[0]:.3g} in {worst[1]}"


@pytest.fixture(scope="module")
def llama_refs(llama_family):
    return {k: str(v) for k, v in llama_family.items()}


def test_every_mergekit_method_is_covered():
    methods = {c.split("-")[0] for c in CASES}
    assert methods == MERGEKIT_METHODS
    from medmerge.merging import methods as mm_methods
    from mergekit.merge_methods import registry

    for name in MERGEKIT_METHODS:
        assert mm_methods.get(name).spec.name == name
        assert registry.get(name).spec.name == name


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit(case, llama_refs, tmp_path):
    cfg = _with_dtype(_cfgs(llama_refs)[case])
    mk = _run_mergekit(cfg, tmp_path / "mergekit")
    mm = _run_medmerge(cfg, tmp_path / "medmerge")
    _compare(mk, mm, exact=cfg["merge_method"] == "linear")
    # the merge did something: not simply a copy of one input (passthrough without scale aside)
    if case != "passthrough":
        a = _load(Path(llama_refs["a"]))
        assert any(not torch.equal(mm[k], a[k]) for k in mm)


def test_gradient_and_filter_resolution_matches_mergekit_layerwise(llama_refs, tmp_path):
    """The linear gradient config gives different weights per layer and per module; check
    the medmerge output is what the resolved weights imply, so the oracle test cannot pass
    with both tools ignoring gradients the same way."""
    cfg = _with_dtype(_cfgs(llama_refs)["linear-gradient-filter"])
    mm = _run_medmerge(cfg, tmp_path / "mm")
    src = {k: _load(Path(llama_refs[k])) for k in ("a", "b", "c")}

    def expect(name, t, mlp):
        wa = 0.1 + 0.8 * t
        wb = 0.9 + (0.2 - 0.9) * t if mlp else 0.4
        wc = 1.0 - t  # [1.0, 0.5, 0.0] over t
        total = wa + wb + wc
        return (wa * src["a"][name].double() + wb * src["b"][name].double() + wc * src["c"][name].double()) / total

    for name, t in (("model.layers.0.mlp.up_proj.weight", 0.0), ("model.layers.1.mlp.up_proj.weight", 1.0),
                    ("model.layers.1.self_attn.q_proj.weight", 1.0), ("model.embed_tokens.weight", 0.0),
                    ("model.norm.weight", 0.0), ("lm_head.weight", 0.0)):
        torch.testing.assert_close(mm[name].double(), expect(name, t, "mlp" in name), atol=1e-6, rtol=0)


def test_tied_embeddings_match_mergekit(qwen_family, tmp_path):
    """Qwen2-style checkpoints without an lm_head tensor (tie_word_embeddings)."""
    f = {k: str(v) for k, v in qwen_family.items()}
    cfg = _with_dtype({"merge_method": "ties", "base_model": f["base"], "parameters": {"lambda": [1.0, 0.8]},
                       "models": [_m(f["a"], weight=0.6, density=0.5), _m(f["b"], weight=[0.2, 0.9], density=0.8)]})
    mk = _run_mergekit(cfg, tmp_path / "mergekit")
    mm = _run_medmerge(cfg, tmp_path / "medmerge")
    assert "model.embed_tokens.weight" in mm and "lm_head.weight" not in mm  # stays tied
    _compare(mk, mm, exact=False)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_agree_with_mergekit_in_distribution(method, llama_refs, tmp_path):
    """density < 1: the masks differ (different RNGs), but both tools keep about `density` of
    each task vector and rescale the survivors to the L1 norm of the dense task vector."""
    f = llama_refs
    cfg = _with_dtype({"merge_method": method, "base_model": f["base"], "random_seed": 5,
                       "parameters": {"density": 0.4, "epsilon": 0.1} if method == "della_linear" else {"density": 0.4},
                       "models": [_m(f["a"], weight=1.0)]})
    mk = _run_mergekit(cfg, tmp_path / "mergekit")
    mm = _run_medmerge(cfg, tmp_path / "medmerge")
    base, a = _load(Path(f["base"])), _load(Path(f["a"]))
    assert sorted(mk) == sorted(mm)
    for name in sorted(mm):
        dense = (a[name] - base[name]).double()
        if dense.numel() < 2000:
            continue
        for out in (mk, mm):
            delta = out[name].double() - base[name].double()
            assert abs((delta != 0).double().mean().item() - 0.4) < 0.05, name
            assert math.isclose(delta.abs().sum().item(), dense.abs().sum().item(), rel_tol=1e-4), name
        assert not torch.equal(mk[name], mm[name])  # different masks, as expected


@pytest.mark.parametrize("case", ["ram", "nearswap"])
def test_elementwise_new_methods_stream_row_chunks_bit_for_bit(case, llama_refs, tmp_path, monkeypatch):
    """ram and nearswap declare themselves elementwise: the executor then merges row chunks; with chunks of
    64 elements (many per tensor) the output is the whole-tensor output, bit for bit, and mergekit's."""
    from medmerge.merging import compute, execute

    cfg = _with_dtype(_cfgs(llama_refs)[case])
    whole = _run_medmerge(cfg, tmp_path / "whole")
    sizes = []

    def small(tp, max_elements):
        chunks = compute.row_chunks(tp, 64)
        sizes.append(len(chunks))
        return chunks

    monkeypatch.setattr(execute, "row_chunks", small)
    streamed = _run_medmerge(cfg, tmp_path / "streamed")
    assert max(sizes) > 4  # really chunked
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)
    _compare(_run_mergekit(cfg, tmp_path / "mergekit"), streamed, exact=False)


def test_arcee_fusion_above_a_million_entries_agrees_with_mergekit_in_distribution():
    """Above 1e6 entries both tools take the quartiles from a sample of 1e6 (mergekit from torch's global RNG,
    medmerge from the tensor's seeded stream): the thresholds differ slightly, the kept share and the kept
    entries barely."""
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    from medmerge.merging import methods as mm_methods
    from medmerge.merging.methods.base import TensorInputs

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1200, 1000, generator=g)
    other = base + torch.randn(1200, 1000, generator=g) * torch.rand(1200, 1, generator=g) * 0.02
    torch.manual_seed(1)
    mk_mask, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(other, base))
    ours = mm_methods.get("arcee_fusion")(TensorInputs([base.clone(), other.clone()], 0, [{}, {}], name="w", seed=3),
                                          {})
    mm_mask = (ours != base).float()
    assert abs(mk_mask.mean().item() - mm_mask.mean().item()) < 0.002
    assert (mk_mask != mm_mask).float().mean().item() < 0.002
    torch.testing.assert_close(ours, base + (other - base) * mm_mask)
