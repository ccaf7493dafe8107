"""Hostile training inputs are clear errors before training (or, for a run that diverges, before anything is
written): infinite or NaN settings, seeds outside numpy's range, no LoRA target, binary data files, prompt
templates str.format cannot fill, and SFT examples whose prompt alone fills max_seq_length."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from medmerge.errors import ConfigError, MedmergeError
from medmerge.io.records import DataError, read_json, read_jsonl, read_table
from medmerge.tiny import BASE_WORDS, make_model
from medmerge.training.config import SEED_MAX, load_config
from medmerge.training.data import build_examples, check_columns, read_records
from medmerge.training.trainer import check_finite_weights, train

TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "threads": 1, "warmup_ratio": 0.0,
         "device": "cpu"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domains")
    make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    with open(root / "sft.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": " ".join(rng.choice(BASE_WORDS) for _ in range(5)), "findings": "chest pain",
                                "response": " ".join(rng.choice(BASE_WORDS) for _ in range(3))}) + "\n")
    return root


def _config(world: Path, name: str, overrides=(), **kw):
    cfg = {"stage": "sft", "model": "base", "data": {"path": "sft.jsonl"}, "max_seq_length": 64,
           "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, "training": dict(TRAIN), **kw}
    path = world / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, list(overrides))


@pytest.mark.parametrize("override", ["training.lr=.inf", "training.weight_decay=.inf", "training.lr=.nan",
                                      "training.epochs=.inf", "training.max_grad_norm=.inf", "lora.alpha=.inf",
                                      "lora.dropout=.nan"])
def test_training_floats_must_be_finite(world, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        _config(world, "inf", [override])


@pytest.mark.parametrize("seed", ["-1", str(SEED_MAX + 1), "true"])
def test_seed_outside_numpy_range_is_refused(world, seed):
    with pytest.raises(ConfigError, match="seed: Input should be"):
        _config(world, "seed", [f"seed={seed}"])
    assert _config(world, "seed_ok", [f"seed={SEED_MAX}"]).seed == SEED_MAX


def test_lora_needs_a_target_module(world):
    with pytest.raises(ConfigError, match="lora.target_modules: List should have at least 1 item"):
        _config(world, "targets", ["lora.target_modules=[]"])


@pytest.mark.parametrize("name", ["bin.jsonl", "bin.json", "bin.csv", "bin.tsv", "bin.txt"])
def test_binary_data_file_is_a_data_error_naming_it(world, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"prompt": "a"}\n' + bytes(range(128, 256)) * 4)
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text \(line 2, .*re-save it as UTF-8"):
        read_records(_config(world, "bin", data={"path": str(path)}).data)


def test_binary_file_through_the_shared_readers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n\x80\x81\x82\n')
    with pytest.raises(DataError, match=r"x.jsonl: not UTF-8 text \(line 3, byte 18: invalid start byte\)"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"x.jsonl: not UTF-8 text \(line 3"):
        read_json(path, list, "a list")
    (tmp_path / "ok.csv").write_text('a,b\n"x\r\ny",2\n', newline="")
    assert read_table(tmp_path / "ok.csv") == [{"a": "x\r\ny", "b": "2"}]  # quoted newlines kept as written


@pytest.mark.parametrize("template, message", [
    ("Findings: {findings", r"data.prompt_template 'Findings: \{findings' is not a valid template"),
    ("Findings: {0}", r"positional field \{0\}"),
    ("Findings: {}", r"positional field \{\}"),
    ("Findings: {findings.upper}", r"not a plain column name"),
    ("Findings: }", r"is not a valid template \(Single '\}'"),
])
def test_prompt_template_str_format_cannot_use_is_a_config_error(world, template, message):
    cfg = _config(world, "tpl", data={"path": "sft.jsonl", "prompt_template": template})
    rows = read_records(cfg.data)
    with pytest.raises(ConfigError, match=message):
        check_columns(rows, cfg)


def test_prompt_template_checked_on_every_record(world, tmp_path):
    data = tmp_path / "some.jsonl"
    data.write_text(json.dumps({"findings": "a", "response": "b"}) + "\n" + json.dumps({"response": "c"}) + "\n")
    cfg = _config(world, "tpl2", data={"path": str(data), "prompt_template": "F: {findings}\nImpression:"})
    with pytest.raises(DataError, match=r"some.jsonl, record 2: data.prompt_template names column\(s\) 'findings'"):
        check_columns(read_records(cfg.data), cfg)
    ok = _config(world, "tpl3", data={"path": "sft.jsonl", "prompt_template": "F: {findings!r:>12} {{x}}"})
    check_columns(read_records(ok.data), ok)  # conversions, specs and escaped braces are fine


def test_sft_examples_with_no_trained_token_are_left_out_and_counted(world, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    long = " ".join(["patient"] * 40)
    rows = [{"prompt": long, "response": "fever"}, {"prompt": "short", "response": "cough"},
            {"prompt": long, "response": "dose"}]
    cfg = _config(world, "long", max_seq_length=16)
    examples, stats = build_examples(tok, rows, cfg)
    assert len(examples) == 1 and stats["examples"] == 1 and stats["no_trained_token"] == 2
    assert "left out 2 of 3 example(s) (record(s) 1, 3)" in capsys.readouterr().err
    with pytest.raises(DataError, match="no example has a response token left within max_seq_length=16"):
        build_examples(tok, [rows[0], rows[2]], cfg)
    _, normal = build_examples(tok, [rows[1]], cfg)
    assert "no_trained_token" not in normal  # records of ordinary data are unchanged


def test_prompt_truncation_keeps_the_whole_answer(world):
    """Regression (real clinical dialogues are longer than a CPU run's max_seq_length): with truncation: prompt a
    long prompt loses tokens from its middle, and the answer with its end-of-turn token is trained whole."""
    from transformers import AutoTokenizer

    from medmerge.training.data import IGNORE, KEEP_HEAD, KEEP_TAIL

    tok = AutoTokenizer.from_pretrained(str(world / "base"))
    tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>{% endif %}")
    long = " ".join(["patient", "reports", "chest", "pain"] * 100)  # 400 words
    rows = [{"prompt": long, "response": "fever cough denies history"}, {"prompt": "short", "response": "cough"}]
    end_cfg = _config(world, "trunc_end", max_seq_length=300)
    cut_cfg = _config(world, "trunc_prompt", max_seq_length=300, truncation="prompt")
    (ex_end, end_stats), (ex_cut, stats) = (build_examples(tok, rows, c) for c in (end_cfg, cut_cfg))
    long_cut = ex_cut[0]
    answer = tok("fever cough denies history</s>", add_special_tokens=False)["input_ids"]
    assert len(long_cut["input_ids"]) == 300 and stats["truncated"] == 1
    trained = [t for t in long_cut["labels"] if t != IGNORE]
    assert trained == answer  # the whole answer, end-of-turn token included
    full = tok("<s>" + long + "</s><s>", add_special_tokens=False)["input_ids"]
    context = long_cut["input_ids"][:len(long_cut["input_ids"]) - len(answer)]
    assert context[:KEEP_HEAD] == full[:KEEP_HEAD] and context[-KEEP_TAIL:] == full[-KEEP_TAIL:]
    # "end" (the default) cuts the same example's answer off entirely: it is left out
    assert len(ex_end) == 1 and end_stats["no_trained_token"] == 1 and "no_trained_token" not in stats
    assert ex_cut[1] == ex_end[0]  # short examples are the same either way
    with pytest.raises(ConfigError, match="truncation"):
        _config(world, "trunc_bad", truncation="middle")


def test_diverged_weights_are_refused_and_nothing_is_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    frozen = torch.nn.Linear(2, 2)
    model.frozen = frozen
    frozen.weight.requires_grad_(False)
    with torch.no_grad():
        frozen.weight[0, 0] = float("nan")  # not trained: it cannot have diverged (and is the base's business)
    work = tmp_path / "out.medmerge-work"
    work.mkdir()
    check_finite_weights(model, tmp_path / "out", work, 1.0)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(MedmergeError, match=r"training diverged: 1 of 3 trained tensor\(s\) .*\(weight\).*nothing was "
                                            r"written to .*out.*Lower training.lr"):
        check_finite_weights(model, tmp_path / "out", work, float("nan"))
    assert not work.exists()


def test_a_run_that_diverges_writes_no_model(world, tmp_path):
    cfg = _config(world, "diverge", ["training.lr=3e38", "training.scheduler=constant", "training.max_grad_norm=0",
                                     "training.batch_size=2"])  # finite settings, but the second step overflows
    with pytest.raises(MedmergeError, match="training diverged"):
        train(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.medmerge-work").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir() if p.name != ".out.medmerge-lock")
