"""mergekit's `slices:` form (layer stacking, partial merges), with mergekit 0.1.5 as the oracle.

Four-layer tiny Llamas. Each config runs through mergekit's `run_merge` and through `medmerge.merge`; every output
tensor must agree within 1e-6 (bit for bit for passthrough), the output names and layer count must agree, and
the output must load in transformers and pass `medmerge verify`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge
from medmerge.errors import ConfigError

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict[str, str]:
    from conftest import llama_fine_tunes

    return {k: str(v) for k, v in llama_fine_tunes(tmp_path_factory.mktemp("slices"), seed=40, layers=4).items()}


def _src(model, start, end, **params):
    s = {"model": model, "layer_range": [start, end]}
    if params:
        s["parameters"] = params
    return s


def _cases(f) -> dict[str, dict]:
    a, b, c, base = f["a"], f["b"], f["c"], f["base"]
    return {
        # layer stacking with overlapping ranges: 3 + 3 = 6 layers, layers 1-2 of both models reused
        "passthrough-stack": {"merge_method": "passthrough", "slices": [
            {"sources": [_src(a, 0, 3)]}, {"sources": [_src(b, 1, 4)]}]},
        # a partial merge: SLERP per slice, the slice's own t gradient, a filter at the top level
        "slerp-per-slice": {"merge_method": "slerp", "base_model": base,
                            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
                            "slices": [
                                {"sources": [_src(base, 0, 2), _src(a, 0, 2)]},
                                {"sources": [_src(base, 2, 4), _src(a, 2, 4)], "parameters": {"t": [0.2, 0.8]}}]},
        # three models, per-source parameters, a slice-level base_model overriding the top level's
        "ties-3-models": {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.6},
                          "slices": [
                              {"sources": [_src(base, 0, 2), _src(a, 0, 2, weight=0.5),
                                           _src(b, 0, 2, weight=[0.2, 0.9]), _src(c, 0, 2, weight=0.3, density=0.4)]},
                              {"sources": [_src(a, 2, 4, weight=1.0), _src(b, 2, 4, weight=0.5),
                                           _src(base, 2, 4, weight=0.7)], "base_model": a,
                               "parameters": {"lambda": 1.2}}]},
        # linear gradients across a one-layer slice (t = 1) and a three-layer one, reordered layers
        "linear-gradient": {"merge_method": "linear", "slices": [
            {"sources": [_src(a, 3, 4, weight=[0.1, 0.9]), _src(b, 0, 1, weight=0.5)]},
            {"sources": [_src(a, 0, 3, weight=[1.0, 0.0]), _src(c, 1, 4, weight=MLP)]}]},
    }


MLP = [{"filter": "mlp", "value": [0.3, 0.7]}, {"value": 0.4}]
CASES = list(_cases({k: k for k in ("a", "b", "c", "base")}))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", CASES)
def test_slices_match_mergekit(case, four, tmp_path):
    cfg = {**_cases(four)[case], "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu"))
    medmerge.merge(cfg, tmp_path / "mm", progress=False)
    mk, mm = _load(tmp_path / "mk"), _load(tmp_path / "mm")
    assert sorted(mk) == sorted(mm)
    for name in mk:
        assert mk[name].shape == mm[name].shape, name
        if case.startswith("passthrough"):
            assert torch.equal(mk[name], mm[name]), name
        else:
            assert (mk[name].double() - mm[name].double()).abs().max().item() <= 1e-6, name
    layers = {k: json.loads((tmp_path / k / "config.json").read_text())["num_hidden_layers"] for k in ("mk", "mm")}
    expected = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
    assert layers == {"mk": expected, "mm": expected}


def test_a_stacked_model_is_the_source_layers_in_order_loads_and_verifies(four, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {**_cases(four)["passthrough-stack"], "dtype": "float32"}
    medmerge.merge(cfg, tmp_path / "stack", progress=False)
    out, a, b = _load(tmp_path / "stack"), _load(Path(four["a"])), _load(Path(four["b"]))
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(out[f"model.layers.{out_layer}.mlp.down_proj.weight"], src[name])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])  # the last slice's
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stack"))
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    report = medmerge.verify(tmp_path / "stack")
    assert report.ok


@pytest.mark.parametrize("slices, message", [
    ([{"sources": [{"model": "A", "layer_range": [2, 6]}]}], r"layer_range \[2, 6\] reaches past the 4 layers"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     "must span the same number of layers"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2], "parameters": {"wieght": 1}}]}],
     "unknown parameter `wieght`"),
])
def test_bad_slices_are_refused_before_any_tensor_is_read(four, tmp_path, slices, message):
    for s in slices:
        for src in s["sources"]:
            src["model"] = four[src["model"].lower()]
    cfg = {"merge_method": "linear", "slices": slices}
    if "wieght" not in message:
        for s in cfg["slices"]:
            for src in s["sources"]:
                src.setdefault("parameters", {"weight": 1.0})
    with pytest.raises(ConfigError, match=message):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_method_with_a_base_needs_it_among_the_slice_sources(four, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": four["base"], "parameters": {"t": 0.5},
           "slices": [{"sources": [_src(four["a"], 0, 4), _src(four["b"], 0, 4)]}]}
    with pytest.raises(ConfigError, match=r"slices\[0\]: the base model .* is not one of this slice's sources"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
