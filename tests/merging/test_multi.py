"""Multi-document configs (mergekit-multi's format): a chain of merges with cached, verified intermediates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import medmerge
from medmerge.cli import app
from medmerge.errors import ConfigError, MedmergeError
from medmerge.merging import merge_chain


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _chain(f: dict, step1_weight: float = 0.6) -> str:
    return f"""name: soup
merge_method: linear
models:
  - {{model: {f['a']}, parameters: {{weight: {step1_weight}}}}}
  - {{model: {f['b']}, parameters: {{weight: 0.4}}}}
dtype: float32
---
name: tied-up
merge_method: ties
base_model: {f['base']}
models:
  - {{model: soup, parameters: {{weight: 0.7, density: 0.6}}}}
  - {{model: {f['c']}, parameters: {{weight: 0.3, density: 0.8}}}}
dtype: float32
---
merge_method: slerp
base_model: {f['base']}
parameters: {{t: [0.2, 0.8]}}
models:
  - model: {f['base']}
  - model: tied-up
dtype: float32
"""


@pytest.fixture()
def fam(llama_family):
    return {k: str(v) for k, v in llama_family.items()}


def test_a_chain_runs_in_order_caches_its_intermediates_and_matches_mergekit(fam, tmp_path):
    cfg = tmp_path / "chain.yml"
    cfg.write_text(_chain(fam))
    r = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    inter = tmp_path / "out.intermediate"
    assert sorted(p.name for p in inter.iterdir()) == ["soup", "tied-up"]
    for name in ("soup", "tied-up"):
        rec = json.loads((inter / name / "medmerge_multi.json").read_text())
        assert rec["name"] == name and len(rec["config_sha256"]) == 64 and rec["inputs"]
    # the same three merges run one by one give the same model, bit for bit
    medmerge.merge({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": fam["a"], "parameters": {"weight": 0.6}}, {"model": fam["b"], "parameters": {"weight": 0.4}}]},
        tmp_path / "s1", progress=False)
    medmerge.merge({"merge_method": "ties", "base_model": fam["base"], "dtype": "float32", "models": [
        {"model": str(tmp_path / "s1"), "parameters": {"weight": 0.7, "density": 0.6}},
        {"model": fam["c"], "parameters": {"weight": 0.3, "density": 0.8}}]}, tmp_path / "s2", progress=False)
    medmerge.merge({"merge_method": "slerp", "base_model": fam["base"], "parameters": {"t": [0.2, 0.8]},
                    "dtype": "float32", "models": [{"model": fam["base"]}, {"model": str(tmp_path / "s2")}]},
                   tmp_path / "s3", progress=False)
    out, by_hand = _load(tmp_path / "out"), _load(tmp_path / "s3")
    assert out.keys() == by_hand.keys() and all(torch.equal(out[k], by_hand[k]) for k in out)

    mergekit = pytest.importorskip("mergekit")  # noqa: F841 - the oracle: mergekit-multi's own loader and run_merge
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from mergekit.scripts.multimerge import load_config

    mk_inter = tmp_path / "mk_inter"
    configs, deps = load_config(_chain(fam), str(mk_inter))
    done: set = set()
    while len(done) < len(configs):
        for name, c in configs.items():
            if name not in done and deps[name] <= done:
                run_merge(c, str(mk_inter / name) if name else str(tmp_path / "mk_out"),
                          MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu"))
                done.add(name)
    mk = _load(tmp_path / "mk_out")
    assert mk.keys() == out.keys()
    assert max((mk[k].double() - out[k].double()).abs().max().item() for k in mk) <= 1e-6


def test_a_rerun_reuses_unchanged_intermediates_and_redoes_changed_ones(fam, tmp_path, capsys):
    cfg = tmp_path / "chain.yml"
    cfg.write_text(_chain(fam))
    merge_chain(cfg, tmp_path / "out", progress=False)
    inter = tmp_path / "out.intermediate"
    stamps = {n: (inter / n / "model.safetensors").stat().st_mtime_ns for n in ("soup", "tied-up")}
    ran = merge_chain(cfg, tmp_path / "out", force=True, progress=False)
    assert [r.out for r in ran] == [tmp_path / "out"]  # only the final merge ran again
    err = capsys.readouterr().err
    assert "intermediate 'soup': unchanged, reused" in err and "verified" in err
    assert {n: (inter / n / "model.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    cfg.write_text(_chain(fam, step1_weight=0.9))  # the first step changes: it and what reads it run again
    ran = merge_chain(cfg, tmp_path / "out", force=True, progress=False)
    assert [r.out.name for r in ran] == ["soup", "tied-up", "out"]
    ran = merge_chain(cfg, tmp_path / "out", force=True, lazy=False, progress=False)  # --no-lazy: all again
    assert len(ran) == 3


@pytest.mark.parametrize("text, message", [
    ("name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\nname: y\nmerge_method: linear\nmodels: [{model: x}]\n"
     "---\nmerge_method: linear\nmodels: [{model: x}]\n", r"cycle \(.*x -> y -> x|cycle \(.*y -> x -> y"),
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\nname: x\nmerge_method: linear\nmodels: [{model: A}]\n"
     "---\nmerge_method: linear\nmodels: [{model: x}]\n", "two documents are named 'x'"),
    ("name: ../evil\nmerge_method: linear\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: A}]\n",
     "must be a plain folder name"),
    ("merge_method: linear\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: A}]\n",
     "2 document\\(s\\) without a `name:`"),
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n"
     "---\n[1, 2]\n", "document 3 is not a mapping"),
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n"
     "tokenizer: {pad_to_multiple_of: 0}\n", "pad_to_multiple_of"),
])
def test_bad_chains_are_refused_before_anything_is_merged(fam, tmp_path, text, message):
    cfg = tmp_path / "chain.yml"
    cfg.write_text(text.replace(": A}", f": {fam['a']}}}"))
    with pytest.raises(ConfigError, match=message):
        merge_chain(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.intermediate").exists()


def test_a_folder_the_chain_did_not_write_is_never_replaced(fam, tmp_path):
    cfg = tmp_path / "chain.yml"
    cfg.write_text(_chain(fam))
    mine = tmp_path / "out.intermediate" / "soup"
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(MedmergeError, match="was not written by this chain"):
        merge_chain(cfg, tmp_path / "out", force=True, progress=False)
    assert (mine / "precious.txt").read_text() == "keep me"
