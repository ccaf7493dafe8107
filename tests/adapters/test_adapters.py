"""`medmerge adapters merge` and adapter verification, against PEFT and hand computations.

Every comparison is on the weight delta W_out - W0 (= sum_i w_i s_i B_i @ A_i),
never on the factors A and B.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medmerge.adapters.combine import combine, stream
from medmerge.adapters.lora import LoraAdapter
from medmerge.adapters.inputs import parse_adapter_arg
from medmerge.adapters.merge import merge_adapters
from medmerge.adapters.verify import verify_adapter_merge
from medmerge.errors import InputError, OutputExistsError
from medmerge.tiny import make_lora_adapter, make_model

MODULES = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    base = make_model(root / "base", hidden=32, layers=2, seed=0)
    other = make_model(root / "other_base", hidden=32, layers=2, seed=5)
    return {
        "root": root,
        "base": base,
        "other": other,
        "pt": make_lora_adapter(root / "pt", base, seed=1, r=4, alpha=8),
        "sft": make_lora_adapter(root / "sft", base, seed=2, r=8, alpha=16),
        "rs": make_lora_adapter(root / "rs", base, seed=3, r=4, alpha=8, use_rslora=True),
        "pat": make_lora_adapter(root / "pat", base, seed=4, r=4, alpha=8,
                                 rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                 alpha_pattern={"v_proj": 3}),
        "emb": make_lora_adapter(root / "emb", base, seed=6, r=4, alpha=4, target_modules=("embed_tokens", "q_proj")),
        "qonly": make_lora_adapter(root / "qonly", base, seed=7, r=4, alpha=8, target_modules=("q_proj",)),
        "foreign": make_lora_adapter(root / "foreign", other, seed=8, r=4, alpha=8),
        "dora": make_lora_adapter(root / "dora", base, seed=9, r=4, alpha=8, use_dora=True),
        "bias": make_lora_adapter(root / "bias", base, seed=10, r=4, alpha=8, lora_bias=True),
    }


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _peft_merged(base: Path, adapters: list[tuple[Path, float]], combination: str = "cat") -> dict:
    """The PEFT route: load, add_weighted_adapter, merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], 1):
        pm.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    if len(adapters) == 1 and adapters[0][1] == 1:
        pm.set_adapter("a0")
    else:
        pm.add_weighted_adapter(names, [w for _, w in adapters], "mix", combination_type=combination)
        pm.set_adapter("mix")
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _hand_delta(adapter: Path, module: str) -> torch.Tensor:
    """s * B @ A computed from the files and the config by hand (PEFT's rules written out)."""
    import re

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    a = sd[f"base_model.model.{module}.lora_A.weight"]
    b = sd[f"base_model.model.{module}.lora_B.weight"]
    r = next((v for k, v in cfg["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)), cfg["r"])
    alpha = next((v for k, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)),
                 cfg["lora_alpha"])
    s = alpha / r ** 0.5 if cfg["use_rslora"] else alpha / r
    assert a.shape[0] == r
    return s * (b @ a)


def _deltas(out: dict, base: dict) -> dict:
    return {k: out[k].float() - base[k].float() for k in base}


def _assert_deltas_close(ours: dict, ref: dict, atol=2e-6) -> None:
    assert ours.keys() == ref.keys()
    changed = 0
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], atol=atol, rtol=1e-5, msg=k)
        changed += bool(ours[k].abs().max() > 0)
    assert changed > 0  # the test would be vacuous if no delta were applied


def test_single_adapter_at_weight_one_equals_peft_merge_and_unload(world, tmp_path):
    merge_adapters(world["base"], [(world["pt"], 1.0)], tmp_path / "out", progress=False)
    base = _state(world["base"])
    ours = _deltas(_state(tmp_path / "out"), base)
    ref = _deltas(_peft_merged(world["base"], [(world["pt"], 1.0)]), base)
    _assert_deltas_close(ours, {k: ref[k] for k in ours})


@pytest.mark.parametrize("pair", [("pt", "sft"), ("rs", "pat"), ("pt", "pat")])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, -0.5)])
def test_weighted_merge_equals_peft_cat_and_hand_computation(world, tmp_path, pair, weights):
    """Different ranks, rslora, rank_pattern/alpha_pattern, negative weights."""
    adapters = [(world[pair[0]], weights[0]), (world[pair[1]], weights[1])]
    rec = merge_adapters(world["base"], adapters, tmp_path / "out", progress=False)
    assert rec["verified"]["ok"]
    base = _state(world["base"])
    ours = _deltas(_state(tmp_path / "out"), base)
    # PEFT oracle 1: each adapter merged alone by PEFT, deltas combined with the weights
    singles = [_deltas(_peft_merged(world["base"], [(p, 1.0)]), base) for p, _ in adapters]
    _assert_deltas_close(ours, {k: sum(w * d[k] for (_, w), d in zip(adapters, singles)) for k in ours})
    # PEFT oracle 2: add_weighted_adapter(cat) + merge_and_unload. PEFT 0.21 gives the cat adapter the first
    # adapter's use_rslora with lora_alpha = r, so its scaling is sqrt(r), not 1: wrong when that adapter is rsLoRA.
    cat = _deltas(_peft_merged(world["base"], adapters, "cat"), base)
    if pair[0] == "rs":
        assert not torch.allclose(cat["model.layers.0.self_attn.q_proj.weight"],
                                  ours["model.layers.0.self_attn.q_proj.weight"], atol=1e-4)
    else:
        _assert_deltas_close(ours, {k: cat[k] for k in ours})
    for layer in range(2):
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            module = f"model.layers.{layer}.{m}"
            hand = sum(w * _hand_delta(p, module) for p, w in adapters)
            torch.testing.assert_close(ours[module + ".weight"], hand, atol=2e-6, rtol=1e-5)


def test_peft_linear_combination_is_not_exact_but_ours_is(world, tmp_path):
    """PEFT's `linear` combination (cross terms B_i A_j) differs from the intended delta; ours does not."""
    adapters = [(world["pt"], 0.5), (world["qonly"], 0.5)]
    merge_adapters(world["base"], adapters, tmp_path / "out", allow_missing=True, progress=False)
    base = _state(world["base"])
    ours = _deltas(_state(tmp_path / "out"), base)
    module = "model.layers.0.self_attn.q_proj"
    hand = 0.5 * _hand_delta(world["pt"], module) + 0.5 * _hand_delta(world["qonly"], module)
    torch.testing.assert_close(ours[module + ".weight"], hand, atol=2e-6, rtol=1e-5)
    # modules only pt has: qonly counts as dW = 0
    torch.testing.assert_close(ours["model.layers.0.self_attn.v_proj.weight"],
                               0.5 * _hand_delta(world["pt"], "model.layers.0.self_attn.v_proj"), atol=2e-6, rtol=1e-5)


def test_embedding_lora_is_transposed_like_peft(world, tmp_path):
    merge_adapters(world["base"], [(world["emb"], 0.8)], tmp_path / "out", progress=False)
    base = _state(world["base"])
    ours = _deltas(_state(tmp_path / "out"), base)
    ref = _deltas(_peft_merged(world["base"], [(world["emb"], 0.8)], "cat"), base)
    assert ours["model.embed_tokens.weight"].abs().max() > 0
    _assert_deltas_close(ours, {k: ref[k] for k in ours})


def test_cat_adapter_export_is_exact_and_loads_in_peft(world, tmp_path):
    adapters = [(world["pt"], 0.3), (world["pat"], -0.7)]
    rec = merge_adapters(world["base"], adapters, tmp_path / "cat", method="cat", as_="adapter", progress=False)
    assert rec["verified"]["ok"]
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # 4 + 4 on most modules; rank_pattern covers the others
    merged = _deltas(_peft_merged(world["base"], [(tmp_path / "cat", 1.0)]), _state(world["base"]))
    for layer in range(2):
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            module = f"model.layers.{layer}.{m}"
            hand = sum(w * _hand_delta(p, module) for p, w in adapters)
            torch.testing.assert_close(merged[module + ".weight"], hand, atol=2e-6, rtol=1e-5)


def test_svd_residual_zero_at_full_rank_and_positive_below(world, tmp_path):
    adapters = [(world["pt"], 0.4), (world["sft"], 0.6)]  # ranks 4 + 8
    full = merge_adapters(world["base"], adapters, tmp_path / "r12", method="svd", as_="adapter", rank=12,
                          progress=False)
    assert full["stats"]["svd_relative_residual"] < 1e-6
    low = merge_adapters(world["base"], adapters, tmp_path / "r3", method="svd", as_="adapter", rank=3,
                         progress=False)
    assert low["stats"]["svd_relative_residual"] > 0.05
    assert all(v > 0 for v in low["stats"]["svd_relative_residual_per_module"].values())
    # the exported rank-3 adapter really is the best rank-3 approximation of the exact delta
    module = "model.layers.0.mlp.down_proj"
    exact = 0.4 * _hand_delta(world["pt"], module) + 0.6 * _hand_delta(world["sft"], module)
    exported = LoraAdapter(tmp_path / "r3").delta(module)
    s = torch.linalg.svdvals(exact.double())
    best = float(s[3:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    got = float(torch.linalg.matrix_norm((exact - exported).double()) / torch.linalg.matrix_norm(exact.double()))
    assert got == pytest.approx(best, rel=1e-4)
    assert low["stats"]["svd_relative_residual_per_module"][module] == pytest.approx(best, rel=1e-4)


def test_sparsifying_methods_equal_peft_merge_utils_on_the_deltas(world):
    from peft.utils import merge_utils

    torch.manual_seed(0)
    deltas = [torch.randn(16, 24), torch.randn(16, 24), torch.randn(16, 24)]
    w = [0.5, 0.3, -0.4]
    tw = torch.tensor(w)
    for density in (0.3, 0.7):
        ours = combine([d.clone() for d in deltas], w, "magnitude_prune", density)
        torch.testing.assert_close(ours, merge_utils.magnitude_prune(deltas, tw, density))
        ours = combine([d.clone() for d in deltas], w, "ties", density)
        torch.testing.assert_close(ours, merge_utils.ties(deltas, tw, density, "total"))
    # DARE: PEFT draws its masks from torch's RNG; ours from a recorded PCG64 stream per (seed, module, adapter).
    # Replay our masks and apply PEFT's formulas to the masked deltas (rescale 1/density, then sum or TIES).
    density, seed, module = 0.4, 7, "m"
    masked = []
    for i, d in enumerate(deltas):
        keep = (stream(seed, module, i).draw(d.numel()).reshape(d.shape) < density).float()
        masked.append(d * keep / density)
        assert 0.2 < keep.mean() < 0.6
    ours = combine([d.clone() for d in deltas], w, "dare_linear", density, seed, module)
    torch.testing.assert_close(ours, merge_utils.task_arithmetic(masked, tw))
    ours = combine([d.clone() for d in deltas], w, "dare_ties", density, seed, module)
    sign = merge_utils.calculate_majority_sign_mask(torch.stack(masked), "total")
    ref = merge_utils.disjoint_merge(torch.stack(masked) * tw.view(-1, 1, 1), sign)
    torch.testing.assert_close(ours, ref)
    again = combine([d.clone() for d in deltas], w, "dare_ties", density, seed, module)
    assert torch.equal(ours, again)
    assert not torch.equal(ours, combine([d.clone() for d in deltas], w, "dare_ties", density, seed + 1, module))


def test_ties_full_export_recomputes_and_verifies(world, tmp_path):
    adapters = [(world["pt"], 0.5), (world["sft"], 0.5)]
    rec = merge_adapters(world["base"], adapters, tmp_path / "ties", method="dare_ties", density=0.5, seed=3,
                         progress=False)
    assert rec["verified"]["ok"]
    report = verify_adapter_merge(tmp_path / "ties")
    assert report.ok and len(report.checked) == 6


def _tamper(folder: Path, name: str) -> None:
    file = folder / "model.safetensors"
    sd = load_file(str(file))
    sd[name] = sd[name] + 1e-2
    save_file(sd, str(file), metadata={"format": "pt"})


def test_verify_catches_tampering_sft_only_and_unapplied(world, tmp_path):
    adapters = [(world["pt"], 0.3), (world["sft"], 0.7)]
    merge_adapters(world["base"], adapters, tmp_path / "good", progress=False)
    assert verify_adapter_merge(tmp_path / "good").ok

    shutil.copytree(tmp_path / "good", tmp_path / "tampered")
    _tamper(tmp_path / "tampered", "model.layers.1.mlp.down_proj.weight")
    report = verify_adapter_merge(tmp_path / "tampered")
    assert not report.ok
    assert [c.name for c in report.checked if not c.ok] == ["model.layers.1.mlp.down_proj.weight"]

    shutil.copytree(tmp_path / "good", tmp_path / "tampered_other")
    _tamper(tmp_path / "tampered_other", "model.norm.weight")
    report = verify_adapter_merge(tmp_path / "tampered_other")
    assert not report.ok and any("model.norm.weight" in p for p in report.problems)

    # the SFT-only export: what a pipeline that loads only the second adapter writes
    merge_adapters(world["base"], [(world["sft"], 1.0)], tmp_path / "sft_only", progress=False)
    report = verify_adapter_merge(tmp_path / "sft_only", base=str(world["base"]),
                                  adapters=[(str(p), w) for p, w in adapters])
    assert not report.ok
    assert any("sft" in p and "alone at weight 1" in p for p in report.pitfalls)

    # adapters not applied: the base itself
    report = verify_adapter_merge(world["base"], base=str(world["base"]), adapters=[(str(p), w) for p, w in adapters])
    assert not report.ok and any("adapters were not applied" in p for p in report.pitfalls)

    # a PEFT-made export of the same merge passes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world["base"]), dtype=torch.float32)
    model.load_state_dict(_peft_merged(world["base"], adapters))
    model.save_pretrained(str(tmp_path / "peft_export"))
    report = verify_adapter_merge(tmp_path / "peft_export", base=str(world["base"]),
                                  adapters=[(str(p), w) for p, w in adapters])
    assert report.ok, report.problems + report.pitfalls


def test_single_adapter_weight_one_is_not_flagged_as_pitfall(world, tmp_path):
    merge_adapters(world["base"], [(world["sft"], 1.0)], tmp_path / "one", progress=False)
    report = verify_adapter_merge(tmp_path / "one")
    assert report.ok and not report.pitfalls


def test_bad_inputs_are_refused_with_the_reason(world, tmp_path):
    base = world["base"]
    with pytest.raises(InputError, match="DoRA"):
        merge_adapters(base, [(world["dora"], 1.0)], tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="bias"):
        merge_adapters(base, [(world["bias"], 1.0)], tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="another base"):
        merge_adapters(base, [(world["pt"], 0.5), (world["foreign"], 0.5)], tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="--allow-missing"):
        merge_adapters(base, [(world["pt"], 0.5), (world["qonly"], 0.5)], tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="needs --density"):
        merge_adapters(base, [(world["pt"], 1.0)], tmp_path / "x", method="ties", progress=False)
    with pytest.raises(InputError, match="not a PEFT adapter"):
        merge_adapters(base, [(base, 1.0)], tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="weight"):
        parse_adapter_arg("pt:abc")
    assert not (tmp_path / "x").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge_adapters(base, [(world["pt"], 1.0)], tmp_path / "exists", progress=False)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    merge_adapters(base, [(world["pt"], 1.0)], tmp_path / "exists", force=True, progress=False)
    assert not (tmp_path / "exists" / "keep.txt").exists()


def test_recorded_base_fingerprint_is_enforced(world, tmp_path):
    """An adapter `medmerge train` wrote records its base's fingerprint; another base is refused."""
    from medmerge.io.fingerprint import fingerprint

    adapter = tmp_path / "trained"
    shutil.copytree(world["pt"], adapter)
    (adapter / "medmerge_train.json").write_text(json.dumps({"base": {"fingerprint": fingerprint(world["other"])}}))
    with pytest.raises(InputError, match="recorded base fingerprint"):
        merge_adapters(world["base"], [(adapter, 1.0)], tmp_path / "x", progress=False)
    (adapter / "medmerge_train.json").write_text(json.dumps({"base": {"fingerprint": fingerprint(world["base"])}}))
    merge_adapters(world["base"], [(adapter, 1.0)], tmp_path / "x", progress=False)


def test_cli_merge_and_verify(world, tmp_path):
    from typer.testing import CliRunner

    from medmerge.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["adapters", "merge", "--base", str(world["base"]), "--adapter", f"{world['pt']}:0.3",
                              "--adapter", f"{world['sft']}:0.7", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "medmerge.yml").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "W = W0 + sum_i w_i dW_i" in card and "| 0.3 |" in card and "Passed" in card
    res = runner.invoke(app, ["verify", str(out), "-q"])
    assert res.exit_code == 0, res.output
    _tamper(out, "model.layers.0.self_attn.q_proj.weight")
    res = runner.invoke(app, ["verify", str(out), "-q"])
    assert res.exit_code == 1
    res = runner.invoke(app, ["verify", str(world["base"]), "--base", str(world["base"]), "--adapter",
                              f"{world['pt']}:0.3", "-q"])
    assert res.exit_code == 1 and "not applied" in res.output


def test_sharded_full_export_loads_in_transformers_with_peft_logits(world, tmp_path):
    """--as full through the sharded writer: several shards + index, loads with AutoModelForCausalLM, and gives
    the logits of the base with both adapters applied by PEFT at their weights."""
    from transformers import AutoModelForCausalLM

    adapters = [(world["pt"], 0.3), (world["sft"], 0.7)]
    merge_adapters(world["base"], adapters, tmp_path / "sharded", shard_size="20KB", progress=False)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(world["base"]), dtype=torch.float32)
    ref.load_state_dict(_peft_merged(world["base"], adapters))
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert verify_adapter_merge(tmp_path / "sharded").ok


def test_in_merge_verification_reads_back_every_tensor_and_recomputes_a_sample(world, tmp_path):
    from medmerge.adapters.inputs import open_inputs
    from medmerge.adapters.merge import sample_targets
    from medmerge.io.stream import checksum, readback_problems
    from medmerge.io.checkpoint import Checkpoint

    adapters = [(world["pt"], 0.3), (world["sft"], 0.7)]
    rec = merge_adapters(world["base"], adapters, tmp_path / "sampled", progress=False)
    assert rec["verified"]["ok"] and "read back" in rec["verified"]["mode"]
    full = merge_adapters(world["base"], adapters, tmp_path / "full", verify="full", progress=False)
    assert full["verified"]["mode"] == "full" and full["verified"]["modules_checked"] == 6
    inputs = open_inputs(world["base"], adapters)
    chosen = sample_targets(inputs, 2, seed=0)
    assert {t.rsplit(".", 2)[-2] for t in chosen} == {"q_proj", "v_proj", "down_proj"}  # every kind, even for k=2
    assert sample_targets(inputs, 100, seed=0) == set(inputs.modules)
    inputs.close()
    ckpt = Checkpoint(tmp_path / "sampled")
    sums = {n: checksum(ckpt.read(n)) for n in ckpt.records}
    ckpt.close()
    assert readback_problems(tmp_path / "sampled", sums) == []
    _tamper(tmp_path / "sampled", "model.embed_tokens.weight")
    assert [p.split()[1] for p in readback_problems(tmp_path / "sampled", sums)] == ["model.embed_tokens.weight"]


def test_output_dtype_and_fingerprint_cache(world, tmp_path):
    from medmerge.io.fingerprint import fingerprint

    adapters = [(world["pt"], 0.3), (world["sft"], 0.7)]
    rec = merge_adapters(world["base"], adapters, tmp_path / "bf16", dtype="bfloat16", verify="full", progress=False)
    assert rec["verified"]["ok"]
    state = _state(tmp_path / "bf16")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    module = "model.layers.0.mlp.down_proj"
    w0 = _state(world["base"])[module + ".weight"]
    hand = 0.3 * _hand_delta(world["pt"], module) + 0.7 * _hand_delta(world["sft"], module)
    want = (w0 + hand).to(torch.bfloat16)  # computed in float32, rounded once
    got = state[module + ".weight"]
    assert not torch.equal(want, w0.to(torch.bfloat16))  # the delta survives the rounding
    # equal up to the last bf16 bit where float32 summation order puts W0 + delta on a rounding boundary
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -8)
    assert (got != want).float().mean() < 0.01
    with pytest.raises(InputError, match="--dtype"):
        merge_adapters(world["base"], adapters, tmp_path / "x", dtype="int8", progress=False)
    # the fingerprint is cached, but follows a changed file
    folder = tmp_path / "fp"
    shutil.copytree(world["base"], folder)
    first = fingerprint(folder)
    assert fingerprint(folder) == first
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(folder) != first


# ---- hostile inputs from the QA campaign: clear errors naming adapter, key and value ----------------------------


def _adapter_copy(world, tmp_path, name="adx", src="pt") -> Path:
    return Path(shutil.copytree(world[src], tmp_path / name))


def _edit_adapter_config(folder: Path, text: str | None = None, **changes) -> Path:
    file = folder / "adapter_config.json"
    if text is None:
        cfg = json.loads(file.read_text())
        cfg.update(changes)
        text = json.dumps(cfg)  # NaN is written as the JSON literal NaN, as Python's json reads it
    file.write_text(text)
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"lora_alpha": None}, r"lora_alpha None is not a finite number"),
    ({"lora_alpha": "abc"}, r"lora_alpha 'abc' is not a finite number"),
    ({"lora_alpha": float("nan")}, r"lora_alpha nan is not a finite number"),
    ({"lora_alpha": True}, r"lora_alpha True is not a finite number"),
    ({"r": 0}, r"r 0 is not a positive whole number"),
    ({"r": "four"}, r"r 'four' is not a positive whole number"),
    ({"r": 4.5}, r"r 4.5 is not a positive whole number"),
    ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    ({"alpha_pattern": {"[v_proj": 3}}, r"alpha_pattern key '\[v_proj' is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": -2}}, r"rank_pattern\['q_proj'\] -2 is not a positive whole number"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern\['q_proj'\] 'x' is not a finite number"),
    ({"rank_pattern": ["q_proj"]}, r"rank_pattern .* a mapping"),
])
def test_adapter_config_values_are_checked_and_named(world, tmp_path, changes, match):
    """A05, A06, A10, A13, A14: lora_alpha null / 'abc' / NaN, r 0, an invalid rank_pattern regex."""
    ad = _edit_adapter_config(_adapter_copy(world, tmp_path), **changes)
    with pytest.raises(InputError, match=rf"adx/adapter_config.json: {match}"):
        merge_adapters(world["base"], [(ad, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_config_that_is_not_an_object_and_rank_zero_factors(world, tmp_path):
    """A04: adapter_config.json a JSON list; A06: r 0 with rank-0 factors (ZeroDivisionError)."""
    ad = _edit_adapter_config(_adapter_copy(world, tmp_path), text="[1, 2]")
    with pytest.raises(InputError, match=r"adx/adapter_config.json: expected a JSON object .* got a list"):
        merge_adapters(world["base"], [(ad, 1.0)], tmp_path / "out", progress=False)
    ad = _adapter_copy(world, tmp_path, "zero")
    state = load_file(ad / "adapter_model.safetensors")
    for k in list(state):
        state[k] = torch.zeros(0, state[k].shape[1]) if "lora_A" in k else torch.zeros(state[k].shape[0], 0)
    save_file(state, ad / "adapter_model.safetensors")
    _edit_adapter_config(ad, r=0)
    with pytest.raises(InputError, match=r"zero/adapter_config.json: r 0 is not a positive whole number"):
        merge_adapters(world["base"], [(ad, 1.0)], tmp_path / "out", progress=False)


def test_nan_in_an_adapter_factor_is_named_up_front(world, tmp_path):
    """A09: a NaN in lora_B gave 'the written merge does not match the intended combination'."""
    ad = _adapter_copy(world, tmp_path)
    state = load_file(ad / "adapter_model.safetensors")
    key = sorted(k for k in state if "lora_B" in k)[0]
    state[key][0, 0] = float("nan")
    state[key][1, 0] = float("inf")
    save_file(state, ad / "adapter_model.safetensors")
    for as_, method in (("full", "exact"), ("adapter", "cat"), ("full", "ties")):
        with pytest.raises(InputError, match=rf"adapter .*adx: tensor {key} holds 2 NaN or infinite value"):
            merge_adapters(world["base"], [(ad, 1.0)], tmp_path / "out", as_=as_, method=method,
                           density=0.5 if method == "ties" else None, progress=False)
        assert not (tmp_path / "out").exists()


def test_output_dtype_is_one_of_three(world, tmp_path):
    """A07: --dtype float8_e4m3fn wrote F8 weights though --dtype documents float32, bfloat16 or float16."""
    for dtype in ("float8_e4m3fn", "float8_e5m2", "float64", "half", "int8"):
        with pytest.raises(InputError, match=rf"--dtype '{dtype}': use float32, bfloat16 or float16"):
            merge_adapters(world["base"], [(world["pt"], 1.0)], tmp_path / "out", dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()


def test_svd_rank_above_every_modules_full_rank_is_refused(world, tmp_path):
    """A12: --method svd --as adapter --rank 100000 wrote a giant zero-padded adapter."""
    adapters = [(world["pt"], 1.0), (world["sft"], 1.0)]
    with pytest.raises(InputError, match=r"--rank 100000 is above the full rank of every module \(at most 32"):
        merge_adapters(world["base"], adapters, tmp_path / "out", method="svd", as_="adapter", rank=100000,
                       progress=False)
    assert not (tmp_path / "out").exists()
    rec = merge_adapters(world["base"], adapters, tmp_path / "out", method="svd", as_="adapter", rank=32,
                         progress=False)
    assert rec["rank"] == 32 and rec["stats"]["svd_relative_residual"] < 1e-5


def test_an_adapter_folder_whose_name_has_a_colon(world, tmp_path):
    """A15: an existing folder 'run-12:30' was read as path 'run-12' with weight 30."""
    ad = _adapter_copy(world, tmp_path, "run-12:30")
    assert parse_adapter_arg(str(ad)) == (str(ad), 1.0)
    assert parse_adapter_arg(f"{ad}:0.5") == (str(ad), 0.5)
    assert parse_adapter_arg(f"{world['pt']}:0.3") == (str(world["pt"]), 0.3)
    rec = merge_adapters(world["base"], [parse_adapter_arg(str(ad))], tmp_path / "out", progress=False)
    assert rec["adapter_merge"]["adapters"][0]["weight"] == 1.0


def test_the_same_adapter_twice_is_noted(world, tmp_path):
    """A01: the same adapter given twice (also spelled differently) is legitimate (1 and -1) but noted."""
    rec = merge_adapters(world["base"], [(world["pt"], 1.0), (f"{world['pt']}/.", -1.0)], tmp_path / "out",
                         progress=False)
    notes = " ".join(rec["notes"])
    assert "is given twice" in notes and str(world["pt"]) in notes
    out, base = _state(tmp_path / "out"), _state(world["base"])
    for k in base:
        torch.testing.assert_close(out[k], base[k], atol=1e-6, rtol=0)
