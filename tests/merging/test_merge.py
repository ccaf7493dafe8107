"""Output format: shards, index, config, tokenizer, transformers round trip; vocab alignment;
in-memory merging equals the on-disk merge."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import medmerge
from medmerge.cli import app
from medmerge.io.checkpoint import Checkpoint


def ta_cfg(fam, **params):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.7}},
                   {"model": str(fam["b"]), "parameters": {"weight": 0.4}}],
        **params,
    }


def load_dir(folder):
    ck = Checkpoint(folder)
    return {name: ck.read(name) for name in ck.records}


def test_sharded_output_loads_in_transformers_and_generates(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    medmerge.merge(ta_cfg(llama_family, out_dtype="bfloat16"), out, shard_size="20KB", progress=False)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = load_dir(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for f in ("tokenizer.json", "generation_config.json", "medmerge.yml", "README.md"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(p, tensors[name]), name
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("patient reports chest pain", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


def test_tied_embeddings_stay_tied(qwen_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    medmerge.merge(ta_cfg(qwen_family), out, progress=False)
    tensors = load_dir(out)
    assert "lm_head.weight" not in tensors
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = load_file(qwen_family["base"] / "model.safetensors")
    a = load_file(qwen_family["a"] / "model.safetensors")
    b = load_file(qwen_family["b"] / "model.safetensors")
    name = "model.embed_tokens.weight"
    expected = base[name] + 0.7 * (a[name] - base[name]) + 0.4 * (b[name] - base[name])
    torch.testing.assert_close(tensors[name], expected, rtol=0, atol=1e-6)


def test_in_memory_equals_on_disk(llama_family, tmp_path):
    cfg = {
        "merge_method": "dare_ties", "base_model": "base", "random_seed": 3,
        "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
    }
    disk_cfg = json.loads(json.dumps(cfg))
    disk_cfg["base_model"] = str(llama_family["base"])
    for m in disk_cfg["models"]:
        m["model"] = str(llama_family[m["model"]])
    medmerge.merge(disk_cfg, tmp_path / "out", progress=False)
    on_disk = load_dir(tmp_path / "out")
    states = {k: load_file(llama_family[k] / "model.safetensors") for k in ("base", "a", "b")}
    merger = medmerge.InMemoryMerger(states)
    in_memory = merger.merge(cfg)
    assert in_memory.keys() == on_disk.keys()
    for name in on_disk:
        assert torch.equal(in_memory[name], on_disk[name]), name
    # the same merger re-merges without reloading and leaves its inputs untouched
    before = {k: v.clone() for k, v in states["a"].items()}
    again = merger.merge({**cfg, "random_seed": 4})
    assert any(not torch.equal(again[n], on_disk[n]) for n in on_disk)
    assert all(torch.equal(before[k], merger._cache[("a", k)]) for k in before if ("a", k) in merger._cache)


def test_merge_into_module(llama_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family["base"])
    states = {k: load_file(llama_family[k] / "model.safetensors") for k in ("a", "b")}
    merger = medmerge.InMemoryMerger(states)
    for w in (0.0, 0.25, 1.0):
        cfg = {"merge_method": "linear", "models": [
            {"model": "a", "parameters": {"weight": 1 - w}}, {"model": "b", "parameters": {"weight": w}}]}
        merger.merge_into(model, cfg)
        name = "model.layers.1.mlp.down_proj.weight"
        expected = (1 - w) * states["a"][name] + w * states["b"][name]
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["base", "union"])
def test_vocabulary_alignment(vocab_family, tmp_path, source):
    from transformers import AutoTokenizer

    cfg = {"merge_method": "linear", "tokenizer_source": source, "base_model": str(vocab_family["base"]),
           "models": [{"model": str(vocab_family["base"]), "parameters": {"weight": 0.5}},
                      {"model": str(vocab_family["other"]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    medmerge.merge(cfg, out, progress=False)
    merged = load_dir(out)
    tok_out = AutoTokenizer.from_pretrained(out)
    tok_base = AutoTokenizer.from_pretrained(vocab_family["base"])
    tok_other = AutoTokenizer.from_pretrained(vocab_family["other"])
    vb, vo, vout = tok_base.get_vocab(), tok_other.get_vocab(), tok_out.get_vocab()
    eb = load_file(vocab_family["base"] / "model.safetensors")["model.embed_tokens.weight"]
    eo = load_file(vocab_family["other"] / "model.safetensors")["model.embed_tokens.weight"]
    emb = merged["model.embed_tokens.weight"]
    assert emb.shape[0] == len(vout)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vout)
    if source == "base":
        assert vout == vb
    else:
        assert set(vout) == set(vb) | set(vo)
    for token, i in vout.items():
        if token in vb and token in vo:
            expected = 0.5 * eb[vb[token]] + 0.5 * eo[vo[token]]
        elif token in vb:  # missing from 'other': filled with the base's row
            expected = eb[vb[token]]
        else:  # only in 'other': its row
            expected = eo[vo[token]]
        torch.testing.assert_close(emb[i], expected, rtol=0, atol=1e-6, msg=token)
    assert medmerge.verify(out).ok


def test_cli_merge_verify_and_methods(llama_family, tmp_path):
    import yaml

    runner = CliRunner()
    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(yaml.safe_dump(ta_cfg(llama_family)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg_file), str(out), "-q", "--shard-size", "30KB"])
    assert result.exit_code == 0, result.output
    assert (out / "medmerge.yml").is_file()
    result = runner.invoke(app, ["merge", str(cfg_file), str(out), "-q"])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, ["verify", str(out), "-q", "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and len(report["checked"]) == report["total_tensors"] == 21
    # the resolved medmerge.yml is itself a config that reproduces the merge
    again = tmp_path / "again"
    result = runner.invoke(app, ["merge", str(out / "medmerge.yml"), str(again), "-q"])
    assert result.exit_code == 0, result.output
    a, b = load_dir(out), load_dir(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "dare_ties" in result.output and "della_linear" in result.output
    # a tampered output fails verification with exit status 1
    shard = sorted(out.glob("model-*.safetensors"))[0]
    state = load_file(shard)
    name = next(iter(state))
    state[name] = state[name] * 1.5
    from safetensors.torch import save_file

    save_file(state, shard, metadata={"format": "pt"})
    result = runner.invoke(app, ["verify", str(out), "-q"])
    assert result.exit_code == 1 and "MISMATCH" in result.output


def test_provenance_records_resolved_config(llama_family, tmp_path):
    import yaml

    out = tmp_path / "out"
    medmerge.merge({**ta_cfg(llama_family), "merge_method": "ties"}, out, progress=False)
    doc = yaml.safe_load((out / "medmerge.yml").read_text())
    assert doc["parameters"]["normalize"] is True and doc["parameters"]["lambda"] == 1.0
    assert doc["random_seed"] == 0
    assert len(doc["provenance"]["inputs"]) == 3
    digest = doc["provenance"]["inputs"][0]["files_sha256"]["model.safetensors"]
    assert len(digest) == 64
    card = (out / "README.md").read_text()
    assert "ties" in card and digest in card and "torch" in card


def test_post_merge_check_samples_small_tensors(llama_family, tmp_path):
    result = medmerge.merge(ta_cfg(llama_family), tmp_path / "out", progress=False)
    sizes = sorted(tp.nbytes for tp in result.plan.tensors)
    median = sizes[len(sizes) // 2]
    checked = {c.name for c in result.verification.checked}
    assert len(checked) == 4
    by_name = {tp.name: tp for tp in result.plan.tensors}
    assert all(by_name[n].nbytes <= median for n in checked)
    assert "model.embed_tokens.weight" not in checked


def test_config_shapes_are_cached_so_a_repeated_merge_does_not_import_transformers(llama_family, tmp_path,
                                                                                    monkeypatch):
    import sys

    from medmerge.merging.verify import ConfigShapes

    monkeypatch.setenv("MEDMERGE_CACHE", str(tmp_path / "cache"))
    config = json.loads((llama_family["a"] / "config.json").read_text())
    first = ConfigShapes.from_config(config)
    assert first.shapes and len(list((tmp_path / "cache" / "config_shapes").glob("*.json"))) == 1
    monkeypatch.setitem(sys.modules, "transformers", None)  # importing it now would fail
    again = ConfigShapes.from_config(config)
    assert again.shapes == first.shapes and again.tied == first.tied
    other = ConfigShapes.from_config({**config, "num_hidden_layers": 3})  # another config: not the cached entry
    assert other.shapes is None and "shapes not checked" in other.note
