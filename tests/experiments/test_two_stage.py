"""`medmerge pipeline two-stage-lora` on a tiny model, and the analyses (decoding grid, leakage, loss curves)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from medmerge.experiments.analysis import parse_setting, reasoning_leakage
from medmerge.experiments.plots import loss_curves
from medmerge.errors import ConfigError, InputError
from medmerge.experiments.two_stage_lora import run
from medmerge.tiny import BASE_WORDS, make_model

TRAIN = {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "threads": 1, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_stage")
    make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    (root / "domain.txt").write_text("\n".join(" ".join(rng.choice(BASE_WORDS) for _ in range(30)) for _ in range(40)))
    with open(root / "sft.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": " ".join(rng.choice(BASE_WORDS) for _ in range(5)),
                                "response": " ".join(rng.choice(BASE_WORDS) for _ in range(4))}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"source": " ".join(rng.choice(BASE_WORDS) for _ in range(5)),
                                "summary": " ".join(rng.choice(BASE_WORDS) for _ in range(3))}) + "\n")
    (root / "gen_task.yaml").write_text(yaml.safe_dump({
        "name": "tiny_gen", "data": "gen.jsonl", "input": "source", "target": "summary", "prompt": "{input}",
        "metrics": ["rouge", "bleu"], "max_new_tokens": 6}))
    stage = {"max_seq_length": 32, "training": TRAIN}
    cfg = {
        "base": "base", "seed": 3,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "pt": {"data": {"path": "domain.txt"}, **stage},
        "sft": {"data": {"path": "sft.jsonl"}, **stage},
        "merge": {"w_pt": [0.0, 0.5]},
        "eval": {"tasks": [], "task_files": ["gen_task.yaml"], "limit": 4, "batch_size": 4, "device": "cpu",
                 "max_new_tokens": 6, "chat_template": "none"},
        "decoding": {"w_pt": 0.5, "settings": ["greedy", "t=0.7,p=0.9"]},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _hand_delta(adapter: Path, module: str) -> torch.Tensor:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    a = sd[f"base_model.model.{module}.lora_A.weight"]
    b = sd[f"base_model.model.{module}.lora_B.weight"]
    return (cfg["lora_alpha"] / cfg["r"]) * (b @ a)


@pytest.mark.slow
def test_two_stage_recipe_end_to_end(recipe, tmp_path):
    out = tmp_path / "run"
    res = run(recipe / "recipe.yaml", out, progress=False)
    labels = [m["label"] for m in res["models"]]
    assert labels == ["base", "w_pt=0", "w_pt=0.5", "w_pt=1"]
    for m in res["models"][1:]:
        assert m["verified"]["ok"] and m["w_pt"] + m["w_sft"] == 1
        assert {"tiny_gen/bleu", "tiny_gen/rouge1", "tiny_gen/rouge2", "tiny_gen/rougeL"} <= m["metrics"].keys()
        assert m["reasoning_leakage"]["outputs"] == 4
    # stage 2 is a fresh adapter on the base, not the stage-1 adapter resumed
    sft_record = json.loads((out / "sft_adapter" / "medmerge_train.json").read_text())
    assert sft_record["after_adapter"] is None and sft_record["stage"] == "sft"
    pt_w = load_file(str(out / "pt_adapter" / "adapter_model.safetensors"))
    sft_w = load_file(str(out / "sft_adapter" / "adapter_model.safetensors"))
    assert not any(torch.equal(pt_w[k], sft_w[k]) for k in pt_w if "lora_A" in k)
    # the merge on disk is W0 + 0.5 dW_PT + 0.5 dW_SFT, by hand from the adapter files
    base = load_file(str(recipe / "base" / "model.safetensors"))
    merged = load_file(str(out / "merges" / "w_pt=0.5" / "model.safetensors"))
    module = "model.layers.1.self_attn.v_proj"
    want = 0.5 * _hand_delta(out / "pt_adapter", module) + 0.5 * _hand_delta(out / "sft_adapter", module)
    assert want.abs().max() > 0
    torch.testing.assert_close(merged[module + ".weight"] - base[module + ".weight"], want, atol=1e-6, rtol=1e-5)
    assert (out / "loss_curves.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| w_pt=0.5 | 0.5 | 0.5 |" in table and "tiny_gen/bleu" in table
    dec = json.loads((out / "decoding" / "decoding.json").read_text())
    assert [s["setting"] for s in dec["settings"]] == ["greedy", "t=0.7,p=0.9"]
    assert dec["settings"][1]["gen_kwargs"]["do_sample"] is True
    assert (out / "decoding" / "decoding.png").is_file()

    # a finished run is not overwritten; an interrupted one continues and reuses the trained adapters
    with pytest.raises(InputError, match="--force"):
        run(recipe / "recipe.yaml", out, progress=False)
    (out / "results.json").unlink()
    again = run(recipe / "recipe.yaml", out, progress=False)
    assert again["stages"]["pt"]["reused"] and again["stages"]["sft"]["reused"]
    assert [m["metrics"] for m in again["models"]] == [m["metrics"] for m in res["models"]]


def test_bad_recipe_is_refused_before_training(recipe, tmp_path):
    cfg = yaml.safe_load((recipe / "recipe.yaml").read_text())
    cfg["merge"]["w_pt"] = []
    (recipe / "bad1.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="w_pt is empty"):
        run(recipe / "bad1.yaml", tmp_path / "b1", progress=False)
    cfg = yaml.safe_load((recipe / "recipe.yaml").read_text())
    cfg["pt"]["training"]["learning_rate"] = 1
    (recipe / "bad2.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="pt.training.learning_rate"):
        run(recipe / "bad2.yaml", tmp_path / "b2", progress=False)
    cfg = yaml.safe_load((recipe / "recipe.yaml").read_text())
    cfg["base"] = "${NO_SUCH_VARIABLE_X}/base"
    (recipe / "bad3.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="NO_SUCH_VARIABLE_X"):
        run(recipe / "bad3.yaml", tmp_path / "b3", progress=False)


def test_decoding_settings_parse():
    assert parse_setting("greedy").gen_kwargs == {"do_sample": False}
    s = parse_setting("t=0.6,p=0.8")
    assert s.gen_kwargs == {"temperature": 0.6, "top_p": 0.8, "do_sample": True} and s.name == "t=0.6,p=0.8"
    assert parse_setting("rp=1.2").gen_kwargs == {"repetition_penalty": 1.2, "do_sample": False}
    assert parse_setting({"temperature": 0.7, "top_p": 0.9}).name == "t=0.7,p=0.9"
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_setting("hot")
    with pytest.raises(InputError, match="not a number"):
        parse_setting("t=warm")


def test_reasoning_leakage_counts_generated_outputs_only(tmp_path):
    (tmp_path / "a" / "samples").mkdir(parents=True)
    rows = [{"response": "<think>step one\nstep two</think> The answer."}, {"response": "No trace here."},
            {"response": "<think>unterminated"}, {"response": "x", "option_loglikelihoods": {"x": -1.0}}]
    (tmp_path / "a" / "samples" / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rep = reasoning_leakage({"m": tmp_path / "a"})
    assert rep["m"]["outputs"] == 3 and rep["m"]["matches"] == 1 and rep["m"]["rate"] == pytest.approx(1 / 3)
    rep = reasoning_leakage({"m": tmp_path / "a"}, r"<think>")
    assert rep["m"]["matches"] == 2
    with pytest.raises(InputError, match="not a regular expression"):
        reasoning_leakage({"m": tmp_path / "a"}, "(")
    with pytest.raises(InputError, match="--log-samples"):
        reasoning_leakage({"m": tmp_path})


def test_loss_curves_plot_both_stages(tmp_path):
    for name, losses in (("pt", [3.0, 2.5, 2.2]), ("sft", [2.0, 1.5])):
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)] + [{"step": 3, "eval_loss": 1.9}]
        (tmp_path / name / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = loss_curves({"PT": tmp_path / "pt", "SFT": tmp_path / "sft" / "train_log.jsonl"}, tmp_path / "loss.png")
    assert png.stat().st_size > 1000
    with pytest.raises(InputError, match="train_log.jsonl"):
        loss_curves({"x": tmp_path / "missing"}, tmp_path / "x.png")


def test_shipped_example_recipe_validates(tmp_path):
    """examples/two_stage_lora.yaml parses and resolves ${world} against a built world folder."""
    from medmerge.experiments.two_stage_lora import load

    world = tmp_path / "world"
    world.mkdir()
    (world / "summary.json").write_text(json.dumps({"preset": "full", "seed": 0, "code_version": "x"}))
    example = Path(__file__).resolve().parents[2] / "examples" / "two_stage_lora.yaml"
    cfg, info = load(example, tmp_path / "out", [f"world.dir={world}"])
    assert cfg.base == world / "models" / "base"
    assert cfg.pt.data.path == world / "data" / "corpora" / "clinical.txt"
    assert cfg.eval.data_dir == world / "data" and cfg.eval.include_paths[0].name == "tasks"
    assert cfg.merge.w_pt == [0.0, 0.1, 0.3, 0.5] and cfg.decoding.w_pt == 0.3
    assert info["world"]["preset"] == "full"
