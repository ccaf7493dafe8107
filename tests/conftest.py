"""Shared fixtures: tiny random models built here (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# medmerge's caches (config shapes, model+lora applications, miniclinic builds) in a folder of this run, not ~/.cache
os.environ.setdefault("MEDMERGE_CACHE", __import__("tempfile").mkdtemp(prefix="medmerge-test-cache-"))

import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import yaml  # noqa: E402

from medmerge.evaluation import runner  # noqa: E402
from medmerge.tiny import BASE_WORDS, make_model, tokenizer_words  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (browser.py) for the tests in sub-folders

# Fixtures that build a synthetic world (the miniclinic build, or tiny models scored by the harness):
# every test that uses one, directly or through another fixture, is `slow`.
WORLD_FIXTURES = {"quick_world", "sweep_family"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if WORLD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def llama_fine_tunes(root: Path, *, seed: int, layers: int) -> dict[str, Path]:
    """A Llama-style base (hidden 32, untied lm_head) and three 'fine-tunes' a, b, c of it (seeds seed+1..3)."""
    base = make_model(root / "base", arch="llama", seed=seed, hidden=32, layers=layers, vocab=64)
    family = {"base": base}
    for i, name in enumerate(("a", "b", "c"), start=1):
        family[name] = make_model(root / name, base=base, seed=seed + i, delta_scale=0.05)
    return family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A Llama-style base (hidden 32, 2 layers, untied lm_head) and three 'fine-tunes' of it."""
    return llama_fine_tunes(tmp_path_factory.mktemp("llama"), seed=0, layers=2)


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory) -> dict[str, Path]:
    """A Qwen2-style base with tied embeddings (no lm_head tensor) and two fine-tunes."""
    root = tmp_path_factory.mktemp("qwen")
    base = make_model(root / "base", arch="qwen2", seed=10, hidden=32, layers=2, vocab=64)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=11, delta_scale=0.05),
        "b": make_model(root / "b", base=base, seed=12, delta_scale=0.05),
    }


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("bf16")
    base = make_model(root / "base", arch="llama", seed=20, hidden=32, layers=2, vocab=64, dtype=torch.bfloat16)
    return {"base": base, "a": make_model(root / "a", base=base, seed=21, dtype=torch.bfloat16)}


@pytest.fixture(scope="session")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    """Two models whose tokenizers differ: 'other' drops 4 words and adds 8 of its own."""
    root = tmp_path_factory.mktemp("vocab")
    words = tokenizer_words(64)
    base = make_model(root / "base", arch="llama", seed=30, hidden=32, layers=2, vocab=64, words=words)
    other_words = [w for w in words if w not in ("fever", "cough", "asthma", "dose")]
    other_words = other_words[:60] + [f"med{i}" for i in range(8)]
    other = make_model(root / "other", arch="llama", seed=31, hidden=32, layers=2, vocab=68, words=other_words)
    return {"base": base, "other": other}


@pytest.fixture(scope="session")
def sweep_family(tmp_path_factory) -> Path:
    """A tiny base, a 'clinical' and an 'instruct' fine-tune, two small generation tasks, a sweep config."""
    root = tmp_path_factory.mktemp("sweep")
    base = make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    make_model(root / "clinical", base=base, seed=1, delta_scale=0.2)
    make_model(root / "instruct", base=base, seed=2, delta_scale=0.2)
    rng = random.Random(0)
    for name, teacher in (("follow", "instruct"), ("clinic", "clinical")):
        rows = [{"source": " ".join(rng.choice(BASE_WORDS) for _ in range(5)), "target": "x"} for _ in range(8)]
        _write_task(root, name, rows)
        # the targets are the teacher's own greedy answers, so scores move with t: the instruct model is
        # perfect on tiny_follow, the clinical model on tiny_clinic
        runner.evaluate(root / teacher, [], root / f"teach_{name}", task_files=[root / f"{name}.yaml"],
                        chat_template="none", device="cpu", log_samples=True)
        answers = [json.loads(line) for line in (root / f"teach_{name}" / "samples" / f"tiny_{name}.jsonl").open()]
        for a in answers:
            rows[a["doc_id"]]["target"] = a["response"].strip() or "x"
        _write_task(root, name, rows)
    cfg = {
        "models": {"base": "base", "clinical": "clinical", "instruct": "instruct"},
        "references": ["instruct", "clinical"],
        "grid": [{"method": "linear", "t": [0.0, 0.5, 1.0]}],
        "eval": {"task_files": ["follow.yaml", "clinic.yaml"], "batch_size": 4, "chat_template": "none"},
        "scores": {"if_metric": "tiny_follow/rouge1", "clinical_metrics": ["tiny_clinic/rouge1", "tiny_clinic/bleu"]},
        "select": {"if_retention_min": 0},
        "dtype": "float32", "device": "cpu",
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _write_task(root: Path, name: str, rows: list[dict]) -> None:
    with open(root / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (root / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": f"tiny_{name}", "data": f"{name}.jsonl", "input": "source", "target": "target",
        "prompt": "{input}", "metrics": ["rouge", "bleu"], "max_new_tokens": 4}))


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory) -> tuple[Path, Path]:
    """The quick synthetic world built once per session with `medmerge miniclinic build` -> (root, cache).

    Tests that use it are `slow` (building it takes minutes): `pytest -m "not slow"` runs without it.

    root/world is the build; `cache` is its MEDMERGE_CACHE, so later builds (the demo's) copy it.
    """
    from typer.testing import CliRunner

    from medmerge.cli import app

    root = tmp_path_factory.mktemp("miniclinic")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDMERGE_CACHE", str(cache))
    result = CliRunner().invoke(app, ["miniclinic", "build", str(root / "world"), "--preset", "quick", "-q"])
    mp.undo()
    assert result.exit_code == 0, result.output
    return root, cache
