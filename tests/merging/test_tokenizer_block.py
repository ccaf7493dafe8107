"""The `tokenizer:` block: the output vocabulary (union/base/model), per-token sources (`{kind: zero}`,
`{kind: model_token}`, a model, `force`) and `pad_to_multiple_of`, against mergekit 0.1.5 (rows compared by token
string, since the two tools may number the union's added tokens differently) and against hand computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge
from medmerge.errors import ConfigError


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _vocab(folder) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _cfg(v, **tokenizer) -> dict:
    return {"merge_method": "linear", "base_model": str(v["base"]), "dtype": "float32",
            "models": [{"model": str(v["base"]), "parameters": {"weight": 0.5}},
                       {"model": str(v["other"]), "parameters": {"weight": 0.5}}],
            "tokenizer": {"source": "union", **tokenizer}}


TOKENS = {
    "med0": {"source": {"kind": "zero"}},  # only in 'other': the base's missing row becomes zeros
    "fever": {"source": {"kind": "model_token", "model": "OTHER", "token": "patient"}},  # only in base
    "patient": {"source": "BASE", "force": True},  # in both: every model takes the base's row
    "cough": {"source": {"kind": "model_token", "model": "OTHER", "token_id": 5}},
}


def _tokens(v) -> dict:
    text = json.dumps(TOKENS).replace("OTHER", str(v["other"])).replace("BASE", str(v["base"]))
    return json.loads(text)


def test_per_token_sources_and_padding_by_hand(vocab_family, tmp_path):
    v = vocab_family
    medmerge.merge(_cfg(v, tokens=_tokens(v), pad_to_multiple_of=16), tmp_path / "out", progress=False)
    out, vout = _load(tmp_path / "out"), _vocab(tmp_path / "out")
    vb, vo = _vocab(v["base"]), _vocab(v["other"])
    eb, eo = (load_file(str(Path(v[k]) / "model.safetensors"))["model.embed_tokens.weight"] for k in ("base", "other"))
    emb = out["model.embed_tokens.weight"]
    n = len(vout)
    assert emb.shape[0] == -(-n // 16) * 16 > n
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == emb.shape[0]
    torch.testing.assert_close(emb[vout["med0"]], 0.5 * eo[vo["med0"]], rtol=0, atol=1e-7)  # base: zeros
    torch.testing.assert_close(emb[vout["fever"]], 0.5 * eb[vb["fever"]] + 0.5 * eo[vo["patient"]], rtol=0,
                               atol=1e-7)
    torch.testing.assert_close(emb[vout["patient"]], eb[vb["patient"]], rtol=0, atol=1e-7)  # forced for both
    torch.testing.assert_close(emb[vout["cough"]], 0.5 * eb[vb["cough"]] + 0.5 * eo[5], rtol=0, atol=1e-7)
    # padding rows: the mean of the token rows (of each model, then merged: linear commutes with the mean)
    torch.testing.assert_close(emb[n:], emb[:n].mean(dim=0, keepdim=True).expand(emb.shape[0] - n, -1),
                               rtol=0, atol=1e-6)
    assert medmerge.verify(tmp_path / "out").ok


def test_tokenizer_block_matches_mergekit_token_by_token(vocab_family, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    v = vocab_family
    cfg = _cfg(v, tokens=_tokens(v), pad_to_multiple_of=16)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(write_model_card=False, quiet=True, device="cpu"))
    medmerge.merge(cfg, tmp_path / "mm", progress=False)
    mk, mm = _load(tmp_path / "mk"), _load(tmp_path / "mm")
    vmk, vmm = _vocab(tmp_path / "mk"), _vocab(tmp_path / "mm")
    assert set(vmk) == set(vmm)
    assert sorted(mk) == sorted(mm)
    for name in mk:
        a, b = mk[name], mm[name]
        assert a.shape == b.shape, name
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert (a - b).abs().max().item() <= 1e-6, name
            continue
        for token, i in vmk.items():
            assert (a[i] - b[vmm[token]]).abs().max().item() <= 1e-6, (name, token)
        n = len(vmk)
        assert (a[n:] - b[n:]).abs().max().item() <= 1e-6, (name, "padding rows")


@pytest.mark.parametrize("tokens, message", [
    ({"nosuchtoken": {"source": {"kind": "zero"}}}, "'nosuchtoken' is not a token of the output vocabulary"),
    ({"fever": {"source": "/not/an/input"}}, "is not one of the input models"),
    ({"fever": {"source": "OTHER"}}, "does not have the token 'fever'"),
    ({"med0": {"source": {"kind": "model_token", "model": "BASE", "token_id": 9999}}}, "outside model"),
    ({"med0": {"force": True}}, "force without a source"),
])
def test_bad_token_sources_are_refused_before_merging(vocab_family, tmp_path, tokens, message):
    v = vocab_family
    tokens = json.loads(json.dumps(tokens).replace("OTHER", str(v["other"])).replace("BASE", str(v["base"])))
    with pytest.raises(ConfigError, match=message):
        medmerge.merge(_cfg(v, tokens=tokens), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_block_and_tokenizer_source_exclude_each_other(vocab_family, tmp_path):
    cfg = {**_cfg(vocab_family), "tokenizer_source": "base"}
    with pytest.raises(ConfigError, match="either `tokenizer_source:` or a `tokenizer:` block"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
