"""An interrupted training run keeps its checkpoints: nothing discards them silently, --resume takes the last
complete one, and --resume with another configuration is refused naming what changed."""

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from medmerge.errors import InputError, MedmergeError
from medmerge.tiny import BASE_WORDS, make_model
from medmerge.training.config import load_config
from medmerge.training.trainer import RUN_RECORD, checkpoint_problem, train, work_dir

TRAIN = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "logging_steps": 2, "threads": 1, "warmup_ratio": 0.0,
         "save_steps": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(BASE_WORDS) for _ in range(40)) for _ in range(40)))
    return root


def _config(world: Path, name: str, overrides=()):
    cfg = {"stage": "pt", "model": "base", "data": {"path": "text.txt"}, "max_seq_length": 64,
           "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, "training": dict(TRAIN)}
    path = world / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, list(overrides))


def _interrupted(world: Path, out: Path, at: int = 5):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == at:
                raise KeyboardInterrupt

    cfg = _config(world, "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, callbacks=(Interrupt(),))
    return cfg


@pytest.fixture()
def interrupted(world, tmp_path):
    out = tmp_path / "run"
    cfg = _interrupted(world, out)
    work = work_dir(out)
    assert {p.name for p in work.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return cfg, out, work


def test_rerun_without_resume_keeps_the_checkpoints(interrupted):
    cfg, out, work = interrupted
    with pytest.raises(MedmergeError, match=r"holds the checkpoints of an interrupted run \(up to checkpoint-4\); "
                                            r"pass --resume to continue it, or --force"):
        train(cfg, out, progress=False)
    assert (work / "checkpoint-4" / "optimizer.pt").is_file() and not out.exists()


def test_force_starts_over_and_says_so(interrupted, capsys):
    cfg, out, work = interrupted
    result = train(cfg, out, force=True, progress=False)
    assert result.steps == 6 and not work.exists()
    assert "removing" in capsys.readouterr().err


def test_resume_skips_a_partial_last_checkpoint(interrupted, capsys):
    cfg, out, work = interrupted
    partial = work / "checkpoint-6"  # a kill while the Trainer wrote checkpoint-6: state and weights missing
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"")
    shutil.copytree(work / "checkpoint-4", work / "checkpoint-5")
    weights = work / "checkpoint-5" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated weights
    assert checkpoint_problem(partial) and "truncated" in checkpoint_problem(work / "checkpoint-5")
    assert checkpoint_problem(work / "checkpoint-4") is None
    result = train(cfg, out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint-6" in err and "skipping checkpoint-5" in err
    assert result.steps == 6 and (out / "adapter_model.safetensors").is_file()


def test_resume_with_another_config_names_the_keys(world, interrupted):
    cfg, out, work = interrupted
    with pytest.raises(MedmergeError, match=r"different configuration \(config.training.lr: 0.001 then, 0.005 now\)"):
        train(_config(world, "lr", ["training.lr=5e-3"]), out, resume=True, progress=False)
    with pytest.raises(MedmergeError, match=r"config.lora.r: 2 then, 4 now"):
        train(_config(world, "r", ["lora.r=4"]), out, resume=True, progress=False)
    # how to run may change: threads
    record = json.loads((work / RUN_RECORD).read_text())
    assert record["config"]["training"]["lr"] == 1e-3
    result = train(_config(world, "t", ["training.threads=2"]), out, resume=True, progress=False)
    assert result.steps == 6


def test_resume_refuses_changed_data(world, interrupted, tmp_path):
    cfg, out, work = interrupted
    other = tmp_path / "text.txt"
    other.write_text((world / "text.txt").read_text().replace("the", "a"))
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": other})})
    with pytest.raises(MedmergeError, match=r"data\.sha256"):
        train(changed, out, resume=True, progress=False)


def test_output_may_not_overlap_the_inputs(world, tmp_path):
    cfg = _config(world, "o")
    for out in (world / "base", world, world / "base" / "sub", world / "text.txt"):
        with pytest.raises(InputError, match="an output must be a separate folder"):
            train(cfg, out, force=True, progress=False)
    assert (world / "base" / "config.json").is_file() and (world / "text.txt").is_file()


def test_a_base_without_tokenizer_is_a_clear_error(world, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(world / "base", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    cfg = _config(world, "b").model_copy(update={"model": bare})
    with pytest.raises(InputError, match=f"model {bare} has no tokenizer"):
        train(cfg, tmp_path / "b", progress=False)


@pytest.mark.parametrize("override, key", [("training.threads=0", "threads"), ("training.threads=-2", "threads"),
                                           ("training.max_steps=0", "max_steps"), ("training.epochs=0", "epochs"),
                                           ("training.scheduler=cosnie", "scheduler"),
                                           ("training.weight_decay=-1", "weight_decay"), ("lora.alpha=0", "alpha")])
def test_training_settings_have_declared_domains(world, override, key):
    from medmerge.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        _config(world, "d", [override])


def test_after_adapter_from_another_base_without_a_record_is_refused_by_fingerprint(world, tmp_path):
    twin = make_model(tmp_path / "twin", arch="llama", seed=7, hidden=32, layers=2, vocab=64, max_positions=256)
    first = _config(world, "first").model_copy(update={"model": twin})
    adapter = train(first, tmp_path / "adapter", progress=False).out
    (adapter / "medmerge_train.json").unlink()  # e.g. an adapter trained elsewhere: only its adapter_config.json
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(twin)
    second = _config(world, "second").model_copy(update={"after_adapter": adapter})
    with pytest.raises(InputError, match=rf"adapter {adapter} was trained on another base, {twin}, whose weights "
                                         "differ"):
        train(second, tmp_path / "stage2", progress=False)
    assert not (tmp_path / "stage2").exists()


def test_a_damaged_training_log_names_the_line(tmp_path):
    from medmerge.io.records import DataError
    from medmerge.training.trainer import read_log

    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(DataError, match="train_log.jsonl, line 2: not valid JSON"):
        read_log(tmp_path)
