"""Tiny random models in Hugging Face format, for the demo, tests and benchmarks.

Nothing is downloaded: configs, weights and a small word-level tokenizer are
built here from a seed. transformers, tokenizers and peft are imported inside the
functions, on purpose: importing them takes seconds, and a test pays only for what it builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

BASE_WORDS = [
    "patient", "reports", "chest", "pain", "fever", "cough", "denies", "history", "of", "the", "and", "with",
    "diabetes", "hypertension", "asthma", "medication", "daily", "mg", "dose", "follow", "up", "in", "weeks",
    "summarize", "note", "answer", "question", "yes", "no", "maybe", "please", "write", "list", "bullet",
]


def tokenizer_words(vocab_size: int, extra: Sequence[str] = ()) -> list[str]:
    words = ["<unk>", "<s>", "</s>", "<pad>", *BASE_WORDS, *extra]
    words += [f"tok{i}" for i in range(vocab_size)]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out[:vocab_size]


def save_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def tiny_config(arch: str = "llama", hidden: int = 32, layers: int = 2, vocab: int = 128, heads: int = 4,
                intermediate: Optional[int] = None, tie: Optional[bool] = None, max_positions: int = 128):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=intermediate or hidden * 2,
        vocab_size=vocab, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=bool(tie))
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie)
    raise ValueError(f"unknown tiny architecture {arch!r} (llama, qwen2)")


def make_model(
    path,
    *,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base: Optional[Path] = None,
    delta_scale: float = 0.02,
    words: Optional[list[str]] = None,
    **config_kwargs,
) -> Path:
    """Save a random tiny model; with `base`, a 'fine-tuned' copy: base + delta_scale * noise."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * delta_scale)
    else:
        config = tiny_config(arch, **config_kwargs)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # HF init leaves norms at 1: spread them so merges are informative
            gen = torch.Generator().manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.to(dtype).save_pretrained(str(path), safe_serialization=True)
    if words is None and base is not None and (base / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).is_file():
                (path / name).write_bytes((base / name).read_bytes())
    else:
        save_tokenizer(path, words or tokenizer_words(model.config.vocab_size))
    return path


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def make_lora_adapter(
    path,
    base: Path,
    *,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj", "down_proj"),
    scale: float = 0.05,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter for `base` with random A and B (PEFT would start B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
