"""`medmerge adapters extract` against PEFT, mergekit's `mergekit-extract-lora` and hand-computed SVDs.

The tiny tuned models have known deltas: rank-3 products B @ A on two modules of layer 0, full-rank
noise on every projection of layer 1, and (in `tuned`) a changed final norm. Every comparison is on the
weight delta dW = scaling * B @ A, never on the factors (which an SVD fixes only up to sign and basis).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medmerge.adapters.extract import extract_lora
from medmerge.adapters.lora import pattern_value
from medmerge.adapters.merge import merge_adapters
from medmerge.cli import app
from medmerge.errors import InputError, OutputExistsError
from medmerge.io.fingerprint import check_adapter_base, fingerprint
from medmerge.io.folders import check_adapter
from medmerge.tiny import make_model

torch.set_num_threads(2)

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOW_RANK = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")  # rank-3 deltas
FULL_RANK = 32  # the widest module's min(out, in): hidden 32, intermediate 64 (k/v_proj: 16)
TOL = 1e-5


def _with_weights(base: Path, path: Path, edit) -> Path:
    """A copy of the `base` folder whose weights are edit(state dict)."""
    shutil.copytree(base, path)
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("extract")
    base = make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64)
    gen = torch.Generator().manual_seed(1)

    def linear_deltas(state):
        for module in LOW_RANK:
            w = state[module + ".weight"]
            b = torch.randn(w.shape[0], 3, generator=gen) * 0.1
            a = torch.randn(3, w.shape[1], generator=gen) * 0.1
            state[module + ".weight"] = w + b @ a
        for p in PROJ:
            kind = "self_attn" if p in PROJ[:4] else "mlp"
            name = f"model.layers.1.{kind}.{p}.weight"
            state[name] = state[name] + torch.randn(state[name].shape, generator=gen) * 0.02

    def with_norm(state):
        linear_deltas(state)
        state["model.norm.weight"] = state["model.norm.weight"] + torch.randn(32, generator=gen) * 0.05

    gen.manual_seed(1)
    linear = _with_weights(base, root / "tuned_linear", linear_deltas)
    gen.manual_seed(1)  # the same linear deltas, plus a changed final norm
    tuned = _with_weights(base, root / "tuned", with_norm)
    return {"root": root, "base": base, "tuned": tuned, "linear": linear}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _adapter_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> s * B @ A from the saved factors, s = lora_alpha / r as PEFT reads them from the config."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = sd[key].double(), sd[key.replace("lora_A", "lora_B")].double()
            r = pattern_value(cfg["rank_pattern"], module, cfg["r"])
            alpha = pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
            assert a.shape[0] == r
            out[module] = (alpha / r) * (b @ a)
    return out


def _peft_merged(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], object]:
    """PEFT's own merge of the adapter into BASE (PeftModel.from_pretrained(...).merge_and_unload())."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapter))
    ranks = {name.removeprefix("base_model.model.").removesuffix(".lora_A.default"): m.weight.shape[0]
             for name, m in model.named_modules() if name.endswith("lora_A.default")}
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, ranks


def _delta(world, name: str, tuned: str = "linear") -> torch.Tensor:
    return _state(world[tuned])[name + ".weight"].double() - _state(world["base"])[name + ".weight"].double()


def test_full_rank_reproduces_the_tuned_model_through_peft(world, tmp_path):
    record = extract_lora(world["base"], world["tuned"], tmp_path / "ad", rank=FULL_RANK, progress=False)
    tuned, base = _state(world["tuned"]), _state(world["base"])
    merged, peft_ranks = _peft_merged(world["base"], tmp_path / "ad")
    worst = max(float((merged[k] - tuned[k]).abs().max()) for k in tuned)
    assert worst < TOL, worst  # every tensor: LoRA modules, the saved norm, the untouched rest
    deltas = _adapter_deltas(tmp_path / "ad")
    assert sorted(deltas) == sorted(record["modules"]) and len(deltas) == 9  # 2 low-rank + 7 full-rank
    for module, d in deltas.items():
        peft_delta = merged[module + ".weight"].double() - base[module + ".weight"].double()
        assert float((d - peft_delta).abs().max()) < 1e-6, module  # the adapter's dW is what PEFT merges
        assert float((d - _delta(world, module, "tuned")).abs().max()) < TOL, module
        info = record["modules"][module]
        assert info["rank"] == peft_ranks[module] == min(info["shape"]) == info["full_rank"]
        assert info["energy_kept"] == pytest.approx(1.0, abs=1e-12)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 32 and cfg["modules_to_save"] == ["model.norm"]
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.k_proj": 16,
                                                           r"model\.layers\.1\.self_attn\.v_proj": 16}
    assert record["modules_to_save"] == {"model.norm": ["model.norm.weight"]}
    assert any("narrower than --rank 32" in n for n in record["notes"])
    assert any("5 of 14 LoRA target weights are unchanged" in n for n in record["notes"])
    print(f"full rank: max |PEFT merge - tuned| = {worst:.3g}")


def test_rank3_is_exact_and_rank1_is_the_best_rank1_approximation(world, tmp_path):
    rec3 = extract_lora(world["base"], world["linear"], tmp_path / "r3", rank=3, progress=False)
    d3 = _adapter_deltas(tmp_path / "r3")
    for module in LOW_RANK:
        err = float((d3[module] - _delta(world, module)).abs().max())
        assert err < 1e-6, (module, err)
        assert rec3["modules"][module]["energy_kept"] == pytest.approx(1.0, abs=1e-9)

    rec1 = extract_lora(world["base"], world["linear"], tmp_path / "r1", rank=1, progress=False)
    d1 = _adapter_deltas(tmp_path / "r1")
    assert len(d1) == 9
    for module, got in d1.items():
        u, s, vh = torch.linalg.svd(_delta(world, module), full_matrices=False)
        best = s[0] * torch.outer(u[:, 0], vh[0])  # Eckart-Young: the best rank-1 approximation
        assert float((got - best).abs().max()) < 1e-6, module
        hand = float(s[0] ** 2 / (s ** 2).sum())
        assert rec1["modules"][module]["energy_kept"] == pytest.approx(hand, rel=1e-9)
        assert rec1["modules"][module]["energy_kept"] == pytest.approx(
            1 - float(((_delta(world, module) - got) ** 2).sum() / (s ** 2).sum()), abs=1e-6)
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["rank_pattern"] == {}


def test_auto_rank_keeps_the_smallest_rank_with_the_energy(world, tmp_path):
    record = extract_lora(world["base"], world["linear"], tmp_path / "auto", rank="auto", energy=0.9,
                          progress=False)
    cfg = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    merged, peft_ranks = _peft_merged(world["base"], tmp_path / "auto")
    base = _state(world["base"])
    deltas = _adapter_deltas(tmp_path / "auto")
    for module, info in record["modules"].items():
        s2 = torch.linalg.svdvals(_delta(world, module)) ** 2
        frac = torch.cumsum(s2, 0) / s2.sum()
        k = next(i + 1 for i, f in enumerate(frac) if f >= 0.9)  # by hand: the first rank reaching 0.9
        assert info["rank"] == k == peft_ranks[module], module
        assert info["energy_kept"] == pytest.approx(float(frac[k - 1]), rel=1e-9) and info["energy_kept"] >= 0.9
        assert k == 1 or frac[k - 2] < 0.9
        assert pattern_value(cfg["rank_pattern"], module, cfg["r"]) == k
        peft_delta = merged[module + ".weight"].double() - base[module + ".weight"].double()
        assert float((deltas[module] - peft_delta).abs().max()) < 1e-6
    assert record["modules"][LOW_RANK[0]]["rank"] <= 3
    assert len({i["rank"] for i in record["modules"].values()}) > 1 and cfg["rank_pattern"]

    capped = extract_lora(world["base"], world["linear"], tmp_path / "cap", rank="auto", energy=0.99, max_rank=4,
                          progress=False)
    assert max(i["rank"] for i in capped["modules"].values()) == 4
    exact = extract_lora(world["base"], world["linear"], tmp_path / "all", rank="auto", energy=1.0, progress=False)
    assert [exact["modules"][m]["rank"] for m in LOW_RANK] == [3, 3]  # float32 rounding is not kept as rank


def test_agrees_with_mergekit_extract_lora(world, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.scripts.extract_lora import main as mergekit_extract

    mergekit_extract.main(["--model", str(world["tuned"]), "--base-model", str(world["base"]),
                           "--out-path", str(tmp_path / "mk"), "--max-rank", "3", "--device", "cpu"],
                          standalone_mode=False)
    extract_lora(world["base"], world["tuned"], tmp_path / "mm", rank=3, progress=False)
    theirs, ours = _adapter_deltas(tmp_path / "mk"), _adapter_deltas(tmp_path / "mm")
    assert set(ours) <= set(theirs)  # mergekit also writes the unchanged modules (zero deltas)
    worst = max(float((ours[m] - theirs[m]).abs().max()) for m in ours)
    assert worst < TOL, worst
    for m in set(theirs) - set(ours):
        assert float(theirs[m].abs().max()) < 1e-6
    print(f"mergekit rank 3: max |dW_medmerge - dW_mergekit| = {worst:.3g}")


def test_base_checks_accept_the_adapter_against_its_base_only(world, tmp_path):
    ad = tmp_path / "ad"
    record = extract_lora(world["base"], world["linear"], ad, rank=FULL_RANK, progress=False)
    assert record["base"]["fingerprint"] == fingerprint(world["base"])
    assert check_adapter_base(world["base"], ad) is None  # the recorded fingerprint matched (eval --peft, merge)
    check_adapter(ad, world["base"])  # eval --peft's shape check
    with pytest.raises(InputError, match="recorded base fingerprint"):
        check_adapter_base(world["tuned"], ad)
    merged = merge_adapters(world["base"], [(ad, 1.0)], tmp_path / "full", progress=False)
    assert merged["verified"]["ok"] and not merged["notes"]
    out, tuned = _state(tmp_path / "full"), _state(world["linear"])
    assert max(float((out[k] - tuned[k]).abs().max()) for k in tuned) < TOL


def test_changed_norms_are_saved_whole_or_skipped(world, tmp_path):
    skipped = extract_lora(world["base"], world["tuned"], tmp_path / "skip", rank=3, skip_undecomposable=True,
                           progress=False)
    assert list(skipped["skipped"]) == ["model.norm.weight"] and not skipped["modules_to_save"]
    assert json.loads((tmp_path / "skip" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert "model.norm.weight" not in {k.removeprefix("base_model.model.")
                                       for k in load_file(str(tmp_path / "skip" / "adapter_model.safetensors"))}
    saved = extract_lora(world["base"], world["linear"], tmp_path / "lm", rank=3, save_modules=["lm_head"],
                         progress=False)
    assert saved["modules_to_save"] == {"lm_head": ["lm_head.weight"]}  # asked for: saved though unchanged


def test_a_changed_bias_of_a_lora_target_is_refused_or_saved_whole(tmp_path):
    base = make_model(tmp_path / "qbase", arch="qwen2", seed=3, hidden=32, layers=1, vocab=64)

    def edit(state):
        state["model.layers.0.self_attn.q_proj.bias"] += 0.1
        state["model.layers.0.self_attn.q_proj.weight"] += 0.01
        state["model.layers.0.mlp.up_proj.weight"] += 0.01

    tuned = _with_weights(base, tmp_path / "qtuned", edit)
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias .*--save-module q_proj"):
        extract_lora(base, tuned, tmp_path / "no", rank=2, progress=False)
    assert not (tmp_path / "no").exists()
    record = extract_lora(base, tuned, tmp_path / "ad", rank=1, save_modules=["q_proj"], progress=False)
    assert {m: sorted(t) for m, t in record["modules_to_save"].items()} == {"model.layers.0.self_attn.q_proj": [
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.weight"]}
    assert list(record["modules"]) == ["model.layers.0.mlp.up_proj"]
    merged, _ = _peft_merged(base, tmp_path / "ad")
    want = _state(tuned)
    assert max(float((merged[k] - want[k]).abs().max()) for k in want if k in merged) < TOL
    record = extract_lora(base, tuned, tmp_path / "skip", rank=1, skip_undecomposable=True, progress=False)
    assert list(record["skipped"]) == ["model.layers.0.self_attn.q_proj.bias"]


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "positive whole number"),
    ({"rank": "-2"}, "positive whole number"),
    ({"rank": "eight"}, "positive whole number"),
    ({"rank": 33}, "above the full rank of every module .*at most 32"),
    ({"rank": "auto"}, "needs --energy"),
    ({"rank": "auto", "energy": 0.0}, r"\(0, 1\]"),
    ({"rank": "auto", "energy": 1.5}, r"\(0, 1\]"),
    ({"rank": "auto", "energy": float("nan")}, r"\(0, 1\]"),
    ({"rank": "auto", "energy": 0.9, "max_rank": 0}, "--max-rank"),
    ({"rank": 4, "energy": 0.9}, "--energy applies to --rank auto"),
    ({"rank": 4, "dtype": "int8"}, "--dtype"),
    ({"rank": 4, "save_modules": ["nonesuch"]}, "--save-module nonesuch"),
])
def test_bad_options_are_refused(world, tmp_path, options, match):
    with pytest.raises(InputError, match=match):
        extract_lora(world["base"], world["linear"], tmp_path / "ad", progress=False, **options)
    assert not (tmp_path / "ad").exists()


def test_bad_inputs_and_outputs_are_refused(world, tmp_path):
    def narrower(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:60]

    other = _with_weights(world["base"], tmp_path / "other", narrower)
    with pytest.raises(InputError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \[60, 32\]"):
        extract_lora(world["base"], other, tmp_path / "ad", rank=4, progress=False)
    with pytest.raises(InputError, match="is inside the input"):
        extract_lora(world["base"], world["linear"], world["base"] / "ad", rank=4, progress=False)
    with pytest.raises(InputError, match="same weights .* no delta"):
        extract_lora(world["base"], _with_weights(world["base"], tmp_path / "same", lambda s: None),
                     tmp_path / "ad", rank=4, progress=False)
    with pytest.raises(InputError, match="same folder"):
        extract_lora(world["base"], world["base"], tmp_path / "ad", rank=4, progress=False)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        extract_lora(world["base"], world["linear"], tmp_path / "ad", rank=4, progress=False)
    extract_lora(world["base"], world["linear"], tmp_path / "ad", rank=4, force=True, progress=False)
    assert not (tmp_path / "ad" / "keep.txt").exists() and (tmp_path / "ad" / "adapter_config.json").is_file()


def test_cli_prints_the_table_and_clean_errors(world, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DEBUG", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["adapters", "extract", str(world["base"]), str(world["linear"]), "--rank", "auto",
                                 "--energy", "0.9", "--out", str(tmp_path / "ad"), "-q"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "energy kept" in text and "model.layers.1.mlp.down_proj" in text and "rank auto (energy 0.9" in text
    record = json.loads((tmp_path / "ad" / "medmerge_extract.json").read_text())
    assert math.isclose(record["summary"]["energy_kept"], sum(
        i["energy_kept"] * i["delta_norm"] ** 2 for i in record["modules"].values())
        / sum(i["delta_norm"] ** 2 for i in record["modules"].values()))
    bad = runner.invoke(app, ["adapters", "extract", str(world["base"]), str(world["linear"]), "--rank", "0",
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "positive whole number" in bad.output and "Traceback" not in bad.output


def test_bfloat16_models_with_every_tensor_changed(bf16_family, tmp_path):
    """make_model's fine-tune changes every tensor: embeddings, head and norms are saved whole, as mergekit does."""
    record = extract_lora(bf16_family["base"], bf16_family["a"], tmp_path / "ad", rank=FULL_RANK,
                          svd_dtype="float32", progress=False)
    assert {"model.embed_tokens", "lm_head", "model.norm"} <= set(record["modules_to_save"])
    assert len(record["modules"]) == 14
    merged, _ = _peft_merged(bf16_family["base"], tmp_path / "ad")
    tuned = _state(bf16_family["a"])
    assert max(float((merged[k] - tuned[k].float()).abs().max()) for k in tuned) < TOL
