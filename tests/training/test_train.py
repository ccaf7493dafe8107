"""`medmerge train`: config, k-shot, masking, fresh second-stage adapters, resume, fingerprint, bad input."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medmerge.errors import ConfigError, InputError, MedmergeError
from medmerge.io.records import DataError
from medmerge.io.fingerprint import fingerprint
from medmerge.tiny import BASE_WORDS, make_model
from medmerge.training.config import NAMED_TEMPLATES, load_config
from medmerge.training.data import IGNORE, k_shot_order, pack_documents, sft_example
from medmerge.training.trainer import train

TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "logging_steps": 2, "threads": 1, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    make_model(root / "other", arch="llama", seed=1, hidden=48, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(BASE_WORDS) for _ in range(40)) for _ in range(60)))
    with open(root / "sft.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": "summarize the note of the patient", "label": "ab"[i % 3 == 0],
                                "response": " ".join(rng.choice(BASE_WORDS) for _ in range(6))}) + "\n")
    return root


def _config(world: Path, name: str, **kw) -> Path:
    cfg = {"stage": "sft", "model": "base", "data": {"path": "sft.jsonl"}, "max_seq_length": 64,
           "training": dict(TRAIN), **kw}
    path = world / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_validation_and_overrides(world):
    cfg = load_config(_config(world, "c1"), ["training.lr=5e-4", "lora.r=8", "k_shot=16", "data.label=label"])
    assert cfg.training.lr == 5e-4 and cfg.lora.r == 8 and cfg.k_shot == 16 and cfg.data.label == "label"
    assert cfg.model == (world / "base").resolve() and cfg.data.path == (world / "sft.jsonl").resolve()
    with pytest.raises(ConfigError, match="training.learning_rate: Extra inputs are not permitted"):
        load_config(_config(world, "c2"), ["training.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="after_adapter needs a lora: section"):
        load_config(_config(world, "c3", after_adapter="x"))
    with pytest.raises(ConfigError, match="unknown chat_template 'vicuna'"):
        load_config(_config(world, "c4", chat_template="vicuna"))
    with pytest.raises(ConfigError, match="use KEY=VALUE"):
        load_config(_config(world, "c5"), ["training.lr"])


def test_k_shot_is_deterministic_nested_and_stratified():
    rows = [{"label": "rare" if i % 10 == 0 else "common"} for i in range(200)]
    order = k_shot_order(rows, seed=3, label="label")
    assert order == k_shot_order(rows, seed=3, label="label") and order != k_shot_order(rows, seed=4, label="label")
    assert sorted(order) == list(range(200))
    for k in (16, 64, 128):
        counts = Counter(rows[i]["label"] for i in order[:k])
        assert abs(counts["rare"] - k / 10) <= 1, (k, counts)  # proportional at every prefix
    plain = k_shot_order(rows, seed=3)
    assert set(plain[:64]) <= set(plain[:256]) and plain[:64] == plain[:64]


@pytest.mark.slow  # several training runs
def test_k_shot_selection_is_recorded_and_nested(world, tmp_path):
    recs = []
    for k in (8, 24):
        res = train(load_config(_config(world, f"k{k}", k_shot=k, data={"path": "sft.jsonl", "label": "label"})),
                    tmp_path / f"k{k}", progress=False)
        recs.append(res.record["k_shot"])
    assert recs[0]["k"] == 8 and len(recs[0]["indices"]) == 8
    assert set(recs[0]["indices"]) < set(recs[1]["indices"])  # the 8 are part of the 24


def test_sft_masks_the_prompt_out_of_the_loss(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    messages = [{"role": "user", "content": "summarize the note"}, {"role": "assistant", "content": "patient reports fever"}]
    for name in ("plain", "chatml"):
        ex = sft_example(tok, NAMED_TEMPLATES[name], messages, 512)
        trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
        assert [lab for lab in ex["labels"] if lab != IGNORE] == trained
        expected = "patient reports fever </s>" if name == "plain" else "patient reports fever <unk> <unk> <unk>"  # <|im_end|>: OOV pieces
        assert tok.decode(trained) == expected
        prompt_part = ex["labels"][: len(ex["labels"]) - len(trained)]
        assert all(lab == IGNORE for lab in prompt_part) and len(prompt_part) > 0
    # multi-turn: only the assistant turns are trained
    convo = [*messages, {"role": "user", "content": "and the dose"}, {"role": "assistant", "content": "daily dose"}]
    ex = sft_example(tok, NAMED_TEMPLATES["plain"], convo, 512)
    assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == \
        "patient reports fever </s> daily dose </s>"


def test_pt_packs_documents_with_eos_between(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    blocks = pack_documents(tok, ["patient reports fever", "chest pain", "cough"], 4)  # 9 tokens with EOS
    flat = [t for b in blocks for t in b["input_ids"]]
    assert len(blocks) == 2 and all(len(b["input_ids"]) == 4 and b["labels"] == b["input_ids"] for b in blocks)
    assert tok.decode(flat) == "patient reports fever </s> chest pain </s> cough"  # the partial tail is dropped


def test_outputs_fingerprint_logs_and_plot(world, tmp_path):
    res = train(load_config(_config(world, "pt", stage="pt", data={"path": "text.txt"})), tmp_path / "pt", progress=False)
    out = tmp_path / "pt"
    record = json.loads((out / "medmerge_train.json").read_text())
    assert record["base"]["fingerprint"] == fingerprint(world / "base") and record["kind"] == "full_model"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(r["tokens_per_s"] > 0 and r["learning_rate"] > 0 for r in log)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "model.safetensors").is_file()
    assert yaml.safe_load((out / "train_config.yml").read_text())["stage"] == "pt"
    assert res.steps == 6 and not (tmp_path / "pt.medmerge-work").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def _b_norm(adapter: Path) -> float:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return sum(t.norm().item() for k, t in tensors.items() if "lora_B" in k)


@pytest.mark.slow  # several training runs
def test_second_lora_stage_starts_a_fresh_adapter(world, tmp_path):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    first = tmp_path / "first"
    train(load_config(_config(world, "s1", lora=lora)), first, progress=False)
    assert _b_norm(first) > 0  # trained: B moved away from its zero init
    # a second stage with a vanishing learning rate must still be ~the zero-initialised fresh adapter
    second = tmp_path / "second"
    cfg = load_config(_config(world, "s2", lora=lora, after_adapter=str(first)), ["training.lr=1e-12"])
    res = train(cfg, second, progress=False)
    assert _b_norm(second) < 1e-6
    assert res.record["after_adapter"]["path"] == str(first.resolve())
    assert res.record["after_adapter"]["base_fingerprint"] == fingerprint(world / "base")
    merged = train(load_config(_config(world, "s3", lora=lora, after_adapter=str(first), merge_after_adapter=True)),
                   tmp_path / "merged", progress=False)
    assert merged.record["after_adapter"]["merged_in"] is True


@pytest.mark.slow  # several training runs
def test_resume_continues_from_the_last_checkpoint(world, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    cfg = load_config(_config(world, "r", stage="pt", data={"path": "text.txt"}),
                      ["training.max_steps=8", "training.save_steps=4"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", progress=False, callbacks=(Interrupt(),))
    assert not (tmp_path / "r").exists() and (tmp_path / "r.medmerge-work" / "checkpoint-4").is_dir()
    resumed = train(cfg, tmp_path / "r", resume=True, progress=False)
    straight = train(cfg, tmp_path / "s", progress=False)
    assert resumed.steps == straight.steps == 8
    a, b = load_file(str(tmp_path / "r" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    with pytest.raises(MedmergeError, match="no checkpoint"):
        train(cfg, tmp_path / "none", resume=True, progress=False)


def test_bad_input_is_refused_before_training(world, tmp_path):
    (world / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no records"):
        train(load_config(_config(world, "e1", data={"path": "empty.jsonl"})), tmp_path / "e1")
    with pytest.raises(DataError, match=r"record 1: missing column\(s\) 'answer'"):
        train(load_config(_config(world, "e2", data={"path": "sft.jsonl", "response": "answer"})), tmp_path / "e2")
    with pytest.raises(DataError, match="k_shot=500 but .* has only 60 records"):
        train(load_config(_config(world, "e3", k_shot=500)), tmp_path / "e3")
    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}
    other_adapter = tmp_path / "other_adapter"
    train(load_config(_config(world, "e4", model="other", lora=lora)), other_adapter, progress=False)
    with pytest.raises(InputError, match="trained for another base"):
        train(load_config(_config(world, "e5", lora=lora, after_adapter=str(other_adapter))), tmp_path / "e5")
    with pytest.raises(InputError, match="is a PEFT adapter; give the base model"):
        train(load_config(_config(world, "e6", model=str(other_adapter))), tmp_path / "e6")
    with pytest.raises(ConfigError, match=r"lora.target_modules \['qkv'\] are not modules"):
        train(load_config(_config(world, "e7", lora={**lora, "target_modules": ["qkv"]})), tmp_path / "e7")
    for name in ("e1", "e2", "e3", "e5", "e6", "e7"):
        assert not (tmp_path / name).exists()


@pytest.mark.slow  # several training runs
def test_lora_runs_are_reproducible_from_the_seed(world, tmp_path):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    runs = [load_file(str(train(load_config(_config(world, f"rep{i}", lora=lora)), tmp_path / f"rep{i}",
                                progress=False).out / "adapter_model.safetensors")) for i in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_freeze_keeps_matching_parameters_bit_identical(world, tmp_path):
    cfg = load_config(_config(world, "fr", stage="pt", data={"path": "text.txt"},
                              freeze=["model.embed_tokens.*", "*.layers.0.mlp.*"]))
    train(cfg, tmp_path / "fr", progress=False)
    before, after = load_file(str(world / "base" / "model.safetensors")), load_file(str(tmp_path / "fr" / "model.safetensors"))
    frozen = [k for k in before if k.startswith("model.embed_tokens.") or ".layers.0.mlp." in k]
    assert len(frozen) == 4 and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k in before if k not in frozen and k.endswith("weight") and "norm" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in trained)  # the rest did train
    record = json.loads((tmp_path / "fr" / "medmerge_train.json").read_text())
    assert "model.embed_tokens.weight" in record["frozen"] and "model.layers.0.mlp.up_proj.weight" in record["frozen"]
    with pytest.raises(ConfigError, match="freeze: pattern 'model.embedding' matches no parameter of"):
        train(load_config(_config(world, "fr2", freeze=["model.embedding"])), tmp_path / "fr2", progress=False)
    with pytest.raises(ConfigError, match="freeze is for full fine-tuning"):
        load_config(_config(world, "fr3", freeze=["*"], lora={"r": 2}))


def test_freeze_unseen_tokens_keeps_the_rows_of_absent_tokens(world, tmp_path):
    from transformers import AutoTokenizer

    cfg = load_config(_config(world, "fu", stage="pt", data={"path": "text.txt"}, freeze_unseen_tokens=True))
    res = train(cfg, tmp_path / "fu", progress=False)
    before, after = load_file(str(world / "base" / "model.safetensors")), load_file(str(tmp_path / "fu" / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    seen = {i for line in (world / "text.txt").read_text().splitlines()
            for i in tok(line, add_special_tokens=False)["input_ids"]} | {tok.eos_token_id}  # EOS between documents
    matrices = [k for k in ("model.embed_tokens.weight", "lm_head.weight") if k in before]
    for key in matrices:
        moved = {i for i in range(before[key].shape[0]) if not torch.equal(before[key][i], after[key][i])}
        assert moved == seen, key  # the rows of the tokens in the data moved, and only those
    assert 0 < res.record["unseen_token_rows_frozen"] == before[matrices[0]].shape[0] - len(seen)
    other = [k for k in before if k not in matrices and k.endswith("proj.weight")]
    assert other and all(not torch.equal(before[k], after[k]) for k in other)  # the layers trained as usual
    with pytest.raises(ConfigError, match="freeze_unseen_tokens is for full fine-tuning"):
        load_config(_config(world, "fu2", freeze_unseen_tokens=True, lora={"r": 2}))
    with pytest.raises(ConfigError, match="freeze_unseen_tokens needs training.weight_decay 0"):
        load_config(_config(world, "fu3", freeze_unseen_tokens=True, training={**TRAIN, "weight_decay": 0.1}))
