"""Shared fixtures: tiny random models built here (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from medmerge.tiny import make_model, tokenizer_words  # noqa: E402


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A Llama-style base (hidden 32, 2 layers, untied lm_head) and three 'fine-tunes' of it."""
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64)
    family = {"base": base}
    for i, name in enumerate(("a", "b", "c"), start=1):
        family[name] = make_model(root / name, base=base, seed=i, delta_scale=0.05)
    return family


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
