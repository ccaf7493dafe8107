"""What medmerge needs to know about model layouts, as data.

Layer tensors are found by name (`...layers.N.`, `...h.N.`, `...blocks.N.`), so
any decoder that follows Hugging Face naming works; the tables below add the
vocabulary-indexed tensors and tied-weight aliases of common families.
"""

from __future__ import annotations

import re
from typing import Optional

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

# Output head -> the embedding it is tied to when the checkpoint omits it.
TIED_ALIASES = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
}


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def vocab_axis(name: str) -> Optional[int]:
    return 0 if name.endswith(VOCAB_TENSOR_SUFFIXES) else None


def config_value(config: dict, keys: tuple[str, ...]) -> Optional[int]:
    for key in keys:
        if key in config:
            return config[key]
        text = config.get("text_config")
        if isinstance(text, dict) and key in text:
            return text[key]
    return None


def num_layers(config: dict, tensor_names) -> int:
    """Layers from config.json, else from the tensor names."""
    value = config_value(config, LAYER_COUNT_KEYS)
    if value is not None:
        return int(value)
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_t(name: str, n_layers: int) -> float:
    """Position used to interpolate gradient parameters: idx/(L-1) in layers, 0 outside."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (n_layers - 1) if n_layers > 1 else 1.0
