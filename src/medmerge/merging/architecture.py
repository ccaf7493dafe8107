"""What medmerge needs to know about model layouts, as data.

Layer tensors are found by name (`...layers.N.`, `...h.N.`, `...blocks.N.`), so
any decoder that follows Hugging Face naming works; the tables below add the
vocabulary-indexed tensors and tied-weight aliases of common families.
"""

from __future__ import annotations

import re
from typing import Any, Optional

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
VOCAB_SIZE_KEYS = ("vocab_size", "n_vocab")

# Tensors indexed by token id along axis 0.
VOCAB_TENSOR_SUFFIXES = (
    "embed_tokens.weight",  # llama, mistral, qwen2, gemma, phi3
    "lm_head.weight",
    "wte.weight",  # gpt2
    "word_embeddings.weight",  # bloom, falcon
    "embed_in.weight",  # gpt-neox
    "embed_out.weight",
)

# Vocabulary-indexed output heads (nn.Linear, unlike the embeddings).
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")

# Output head -> the embedding it is tied to when the checkpoint omits it.
TIED_ALIASES = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
}


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def vocab_axis(name: str) -> Optional[int]:
    return 0 if name.endswith(VOCAB_TENSOR_SUFFIXES) else None


def config_setting(config: dict, keys: tuple[str, ...]) -> tuple[Optional[str], Any]:
    """(the first of `keys` config.json gives, at its top level or in `text_config`, its value); (None, None)."""
    for key in keys:
        if key in config:
            return key, config[key]
        text = config.get("text_config")
        if isinstance(text, dict) and key in text:
            return key, text[key]
    return None, None


def config_value(config: dict, keys: tuple[str, ...]) -> Optional[int]:
    return config_setting(config, keys)[1]


class LayerCountError(ValueError):
    """config.json's layer count is not a count, or contradicts the layers the tensors hold."""


def layer_stacks(tensor_names) -> dict[str, int]:
    """Layers each stack of repeated layers holds, by the name before its index: {'model.layers.': 32}
    (a multimodal model also has e.g. 'visual.blocks.')."""
    stacks: dict[str, int] = {}
    for name in tensor_names:
        m = LAYER_RE.search(name)
        if m:
            prefix = name[: m.start(1)]
            stacks[prefix] = max(stacks.get(prefix, 0), int(m.group(1)) + 1)
    return stacks


def num_layers(config: dict, tensor_names) -> int:
    """Layers from config.json, checked against the tensor names; else from the tensor names.

    Raises LayerCountError when config.json's value is not a non-negative whole number, or when no
    stack of layers in the tensors has that many layers (gradients would be placed by a wrong count).
    """
    key, value = config_setting(config, LAYER_COUNT_KEYS)
    stacks = layer_stacks(tensor_names)
    if key is None:
        return max(stacks.values()) if stacks else 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LayerCountError(f"{key} {value!r} is not a non-negative whole number (the model's layer count)")
    extra = config.get("num_nextn_predict_layers") or 0  # DeepSeek-V3's multi-token-prediction layers
    extra = extra if isinstance(extra, int) and not isinstance(extra, bool) else 0
    if stacks and not any(n in (value, value + extra) for n in stacks.values()):
        held = ", ".join(f"{n} layers ({prefix}0 to {prefix}{n - 1})" for prefix, n in sorted(stacks.items()))
        raise LayerCountError(f"{key} {value} does not match the tensors, which hold {held}")
    return value


def layer_t(name: str, n_layers: int) -> float:
    """Position used to interpolate gradient parameters: idx/(L-1) in layers, 0 outside."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (n_layers - 1) if n_layers > 1 else 1.0
