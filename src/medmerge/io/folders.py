"""What a model folder and an adapter folder must hold, checked before anything is loaded; their support files.

`check_model` and `check_adapter` are the one place every command (eval, train, MedCare,
exports) checks its inputs: the folder exists, holds what it should, its weights' headers are
sound, and an adapter's modules fit its base. The support files (config.json with the output
dtype, tokenizer files, generation config) are written the same way by every exporter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import InputError
from .checkpoint import Checkpoint, resolve_model_path

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)
ADAPTER_CONFIG = "adapter_config.json"


def check_model(model: str | Path, allow_pickle: bool = False) -> Path:
    """A local Hugging Face model folder with a config.json and sound weights (not an adapter)."""
    path = resolve_model_path(str(model))
    if not (path / "config.json").is_file():
        if (path / ADAPTER_CONFIG).is_file():
            raise InputError(f"{path} is a PEFT adapter, not a model; pass the base model and --peft {path}")
        raise InputError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
    Checkpoint(path, allow_pickle=allow_pickle)  # weights present and their headers sound
    return path


def check_adapter(adapter: str | Path, model_path: Path, allow_pickle: bool = False) -> Path:
    """The adapter folder exists, loads without pickle, and each LoRA module fits the base's weight shape."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter folder {path} does not exist; pass the folder holding {ADAPTER_CONFIG}")
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"{path} has no {ADAPTER_CONFIG}; pass a PEFT adapter folder")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file() and not allow_pickle:
            raise InputError(f"{path} holds only a pickle adapter (adapter_model.bin); convert it to safetensors "
                             "or pass --allow-pickle if you trust it")
        if not (path / "adapter_model.bin").is_file():
            raise InputError(f"{path} has no adapter_model.safetensors")
        return path.resolve()
    base = Checkpoint(model_path, allow_pickle=allow_pickle)
    base_shapes = {name: record.shape for name, record in base.records.items()}
    base.close()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            target = f"{module}.weight"
            if target not in base_shapes:
                raise InputError(
                    f"adapter {path} was trained for another base: its module {module} is not in {model_path} "
                    "(pass the base model the adapter was trained on)"
                )
            out_features, in_features = base_shapes[target][:2]
            shape = tuple(f.get_slice(key).get_shape())
            expected = in_features if ".lora_A." in key else out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != expected:
                raise InputError(
                    f"adapter {path} was trained for another base: {key} has shape {list(shape)} but {target} in "
                    f"{model_path} has shape {list(base_shapes[target])} (pass the base model the adapter was trained on)"
                )
    return path.resolve()


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (as config.json spells it)."""
    return str(dtype).replace("torch.", "")


def with_dtype(config: dict, dtype: Optional[torch.dtype]) -> dict:
    """A copy of config.json's contents declaring `dtype` (and `torch_dtype`, where the config has that key)."""
    config = dict(config)
    if dtype is not None:
        config["dtype"] = dtype_name(dtype)
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name(dtype)
    return config


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_support_files(src: Path, folder: Path, *, tokenizer: bool = True, generation: bool = True) -> None:
    """The tokenizer files and generation_config.json that `src` has, copied into `folder`."""
    names = (TOKENIZER_FILES if tokenizer else ()) + (("generation_config.json",) if generation else ())
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
