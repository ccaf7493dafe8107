"""Task-vector norms and cosines, checked by hand on a tiny model and on two-tensor checkpoints."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge.errors import InputError
from medmerge.merging.deltas import render_markdown, task_vectors


def _model(folder, tensors):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_norms_and_cosine_match_a_hand_computation(tmp_path):
    # parent: one layer weight [3, 4] (||.||^2 = 9 + 16 = 25) and an embedding [1, 2] (||.||^2 = 4)
    w = torch.tensor([[3.0, 4.0]])
    e = torch.tensor([[2.0, 0.0]])
    parent = _model(tmp_path / "p", {"model.layers.0.mlp.up_proj.weight": w, "model.embed_tokens.weight": e})
    # a moves the layer by (0.3, 0) and the embedding by (0, 1); b moves the layer by (0, 0.4), nothing else
    a = _model(tmp_path / "a", {"model.layers.0.mlp.up_proj.weight": w + torch.tensor([[0.3, 0.0]]),
                                "model.embed_tokens.weight": e + torch.tensor([[0.0, 1.0]])})
    b = _model(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": w + torch.tensor([[0.0, 0.4]]),
                                "model.embed_tokens.weight": e})
    r = task_vectors(parent, {"a": a, "b": b})
    na, nb = r["models"]["a"], r["models"]["b"]
    assert na["non_embedding"]["relative_norm"] == pytest.approx(0.3 / 5)
    assert na["embedding"]["relative_norm"] == pytest.approx(1 / 2)
    assert na["all"]["relative_norm"] == pytest.approx(math.sqrt(0.09 + 1) / math.sqrt(29))
    assert nb["non_embedding"]["relative_norm"] == pytest.approx(0.4 / 5)
    assert nb["embedding"]["relative_norm"] == 0
    (pair,) = r["cosines"]
    assert pair["non_embedding"] == pytest.approx(0.0)  # orthogonal moves
    assert pair["embedding"] is None  # b did not move its embedding: no direction
    assert pair["all"] == pytest.approx(0.0)
    # a second model that moves along a's layer direction, twice as far: cosine 1
    c = _model(tmp_path / "c", {"model.layers.0.mlp.up_proj.weight": w + torch.tensor([[0.6, 0.0]]),
                                "model.embed_tokens.weight": e})
    r2 = task_vectors(parent, {"a": a, "c": c})
    assert r2["cosines"][0]["non_embedding"] == pytest.approx(1.0)
    assert "0.3" not in render_markdown(r) and "6.0%" in render_markdown(r)


def test_a_tiny_llama_against_torch(llama_family):
    r = task_vectors(llama_family["base"], {"a": llama_family["a"], "b": llama_family["b"]})
    p, a, b = (load_file(str(llama_family[n] / "model.safetensors")) for n in ("base", "a", "b"))
    body = [k for k in p if "embed" not in k and "lm_head" not in k]
    da = torch.cat([(a[k].double() - p[k].double()).flatten() for k in body])
    db = torch.cat([(b[k].double() - p[k].double()).flatten() for k in body])
    pn = torch.cat([p[k].flatten().double() for k in body]).norm()
    assert r["models"]["a"]["non_embedding"]["relative_norm"] == pytest.approx(float(da.norm() / pn), rel=1e-9)
    assert r["cosines"][0]["non_embedding"] == pytest.approx(float(da @ db / (da.norm() * db.norm())), rel=1e-9)
    assert r["models"]["a"]["non_embedding"]["tensors"] == len(body)
    assert r["models"]["a"]["embedding"]["tensors"] == len(p) - len(body)


def test_shape_mismatch_is_skipped_and_unrelated_models_are_an_error(tmp_path):
    parent = _model(tmp_path / "p", {"model.layers.0.a.weight": torch.ones(2, 2), "model.embed_tokens.weight":
                                     torch.ones(4, 2)})
    resized = _model(tmp_path / "r", {"model.layers.0.a.weight": torch.ones(2, 2) * 2,
                                      "model.embed_tokens.weight": torch.ones(5, 2)})
    r = task_vectors(parent, {"r": resized})
    assert "shape differs in r" in r["skipped"]["model.embed_tokens.weight"]
    assert r["models"]["r"]["non_embedding"]["relative_norm"] == pytest.approx(1.0)
    other = _model(tmp_path / "o", {"x.weight": torch.ones(2)})
    with pytest.raises(InputError, match="not fine-tunes"):
        task_vectors(parent, {"o": other})
