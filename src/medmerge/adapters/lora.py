"""PEFT LoRA adapters read as weight deltas, exactly as PEFT applies them.

For a module with factors A (r x in) and B (out x r), PEFT adds
dW = s * B @ A to the base weight, with s = lora_alpha / r (or lora_alpha / sqrt(r)
with `use_rslora`), where r and lora_alpha come from `rank_pattern` and
`alpha_pattern` when a pattern matches the module (PEFT's own rule: the first
key K with `re.match(rf"(.*\\.)?({K})$", module)`). Embedding LoRA
(`lora_embedding_A` r x vocab, `lora_embedding_B` dim x r) adds (B @ A)^T, and
`fan_in_fan_out` (GPT-2's Conv1D) adds (B @ A)^T too.

What a weight delta cannot express is refused, with the reason: DoRA (a
magnitude vector rescales the whole weight), LoRA biases, `bias` other than
"none", `modules_to_save` copies, trainable tokens, convolution LoRA and
non-LoRA PEFT types. Adapters are read from safetensors; `adapter_model.bin`
(pickle) only with `allow_pickle`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError
from ..io.checkpoint import DTYPE_NAMES, SAFETENSORS_DTYPES, TensorRecord, scan_safetensors
from ..io.fingerprint import recorded_base_fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])$")


def _rank(value, key: str, where: Path) -> int:
    """A LoRA rank from adapter_config.json: a positive whole number (PEFT divides by it)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: {key} {value!r} is not a positive whole number (the LoRA rank); the adapter "
                         "config is damaged: restore the one saved with the adapter")
    return value


def _alpha(value, key: str, where: Path) -> float:
    """A LoRA alpha from adapter_config.json: a finite number (the scaling is alpha / r)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: {key} {value!r} is not a finite number (the LoRA scaling is lora_alpha / r); "
                         "the adapter config is damaged: restore the one saved with the adapter")
    return float(value)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern key whose regex matches the end of `module`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class LoraModule:
    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: TensorRecord
    b: TensorRecord
    r: int
    alpha: float
    scaling: float
    transpose: bool  # embedding LoRA or fan_in_fan_out: dW = s * (B @ A)^T

    @property
    def target(self) -> str:
        """The base tensor the delta is added to."""
        return self.name + ".weight"

    @property
    def delta_shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)


class LoraAdapter:
    """A PEFT LoRA adapter folder: its config, its modules and their deltas (read lazily)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path).expanduser().absolute()
        p = self.path
        if not p.is_dir():
            raise InputError(f"adapter folder {p} does not exist; pass the folder that holds {CONFIG_NAME}")
        if not (p / CONFIG_NAME).is_file():
            hint = " (it looks like a full model: merge models with `medmerge merge`)" if (p / "config.json").is_file() else ""
            raise InputError(f"{p} has no {CONFIG_NAME}: not a PEFT adapter folder{hint}")
        try:
            self.config = json.loads((p / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p / CONFIG_NAME}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise InputError(f"{p / CONFIG_NAME}: expected a JSON object (PEFT's settings: r, lora_alpha, "
                             f"target_modules, ...), got a {type(self.config).__name__}; restore the "
                             f"{CONFIG_NAME} saved with the adapter")
        self._check_config()
        self._pickled: Optional[dict[str, torch.Tensor]] = None
        self.records = self._scan(allow_pickle)
        self.modules = self._pair()

    # ---- reading -------------------------------------------------------------
    def _check_config(self) -> None:
        c, where = self.config, self.path / CONFIG_NAME
        kind = c.get("peft_type", "LORA")
        if kind != "LORA":
            raise InputError(f"{where}: peft_type {kind}; only LoRA adapters can be merged as weight deltas")
        refusals = [
            (c.get("use_dora"), "uses DoRA: its magnitude vector rescales the whole merged weight, so a weighted sum "
                                "of DoRA adapters is not W0 + sum w_i dW_i; merge each into its own model and merge "
                                "the models with `medmerge merge` instead"),
            (c.get("lora_bias"), "trains LoRA biases (lora_bias: true), which are not part of dW = B @ A"),
            (c.get("bias", "none") != "none", f"trains base biases (bias: {c.get('bias')!r}), which are not part of "
                                              "dW = B @ A; retrain with bias: none"),
            (c.get("modules_to_save"), f"saves whole modules ({c.get('modules_to_save')}) besides LoRA; their weighted "
                                       "combination is not a LoRA delta; retrain without modules_to_save"),
            (c.get("trainable_token_indices"), "trains token embeddings (trainable_token_indices)"),
            (c.get("target_parameters"), "targets parameters directly (target_parameters)"),
            (c.get("layer_replication"), "replicates layers (layer_replication)"),
        ]
        for bad, why in refusals:
            if bad:
                raise InputError(f"adapter {self.path} {why}")
        _rank(c.get("r", 8), "r", where)
        _alpha(c.get("lora_alpha", 8), "lora_alpha", where)
        for key, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
            patterns = c.get(key) or {}
            if not isinstance(patterns, dict):
                raise InputError(f"{where}: {key} {patterns!r} is not a mapping of module patterns to values")
            for pattern, value in patterns.items():
                try:
                    re.compile(rf"(.*\.)?({pattern})$")
                except (re.error, TypeError) as e:
                    raise InputError(f"{where}: {key} key {pattern!r} is not a valid regular expression ({e}); PEFT "
                                     "matches these keys as regexes against module names") from None
                check(value, f"{key}[{pattern!r}]", where)

    def _scan(self, allow_pickle: bool) -> dict[str, TensorRecord]:
        weights = self.path / WEIGHTS_NAME
        if weights.is_file():
            return scan_safetensors(weights)
        if (self.path / PICKLE_NAME).is_file():
            if not allow_pickle:
                raise InputError(f"{self.path} holds only a pickle adapter ({PICKLE_NAME}); convert it to "
                                 "safetensors, or pass --allow-pickle if you trust its source")
            return self._load_pickle(self.path / PICKLE_NAME)
        raise InputError(f"{self.path} has no {WEIGHTS_NAME}")

    def _load_pickle(self, file: Path) -> dict[str, TensorRecord]:
        state = torch.load(file, map_location="cpu", weights_only=True)
        self._pickled = dict(state)
        return {k: TensorRecord(k, file, _dtype_code(v.dtype), tuple(v.shape), 0, 0) for k, v in state.items()}

    def _pair(self) -> dict[str, LoraModule]:
        c = self.config
        parts: dict[str, dict[str, TensorRecord]] = {}
        self.saved_base: dict[str, TensorRecord] = {}  # base tensor name -> copy saved in the adapter
        for key, rec in self.records.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name.endswith("lora_magnitude_vector") or ".lora_magnitude_vector" in name:
                raise InputError(f"adapter {self.path} holds DoRA magnitude vectors ({key}); DoRA cannot be merged "
                                 "as a weight delta")
            if name.endswith(".base_layer.weight"):  # PEFT saves targeted embedding layers whole (save_embedding_layers)
                self.saved_base[name.removesuffix(".base_layer.weight") + ".weight"] = rec
                continue
            m = _FACTOR.match(name)
            if not m:
                if ".lora_B.bias" in name or ".lora_A.bias" in name:
                    raise InputError(f"adapter {self.path}: {key} is a LoRA bias, which is not part of dW = B @ A")
                raise InputError(f"adapter {self.path}: tensor {key} is not a LoRA factor (lora_A/lora_B); "
                                 "only plain LoRA adapters can be merged")
            module = m.group("module") or m.group("emodule")
            part = m.group("part") or m.group("epart")
            parts.setdefault(module, {})[part] = rec
        modules = {}
        for module, pr in sorted(parts.items()):
            emb = "lora_embedding_A" in pr or "lora_embedding_B" in pr
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a_key not in pr or b_key not in pr:
                missing = a_key if a_key not in pr else b_key
                raise InputError(f"adapter {self.path}: module {module} lacks its {missing} factor; the adapter "
                                 "file is incomplete")
            a, b = pr[a_key], pr[b_key]
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise InputError(f"adapter {self.path}: module {module} has {len(a.shape)}-d factors "
                                 "(convolution LoRA); only linear and embedding LoRA can be merged")
            where = self.path / CONFIG_NAME  # every value was checked by _check_config
            r = _rank(pattern_value(c.get("rank_pattern") or {}, module, c.get("r", 8)), "r", where)
            alpha = _alpha(pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8)), "lora_alpha",
                           where)
            if a.shape[0] != r or b.shape[1] != r:
                raise InputError(
                    f"adapter {self.path}: module {module} has rank {a.shape[0]} (A {list(a.shape)}, B {list(b.shape)}) "
                    f"but its config gives r={r}; the config does not belong to these weights")
            scaling = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
            modules[module] = LoraModule(module, a, b, r, alpha, scaling, emb or bool(c.get("fan_in_fan_out")))
        if not modules:
            raise InputError(f"adapter {self.path} holds no LoRA modules")
        return modules

    def saved_base_weight(self, target: str) -> torch.Tensor:
        return self._read(self.saved_base[target])

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32 as stored (A r x in, B out x r; embedding: A r x vocab, B dim x r)."""
        m = self.modules[module]
        return self._read(m.a), self._read(m.b)

    def _read(self, rec: TensorRecord) -> torch.Tensor:
        if self._pickled is not None:
            return self._finite(rec, self._pickled[rec.name].to(torch.float32))
        with open(rec.file, "rb") as f:
            f.seek(rec.start)
            raw = bytearray(f.read(rec.nbytes))
        t = torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[rec.dtype]) if raw else torch.empty(0)
        return self._finite(rec, t.reshape(rec.shape).to(torch.float32))

    def _finite(self, rec: TensorRecord, t: torch.Tensor) -> torch.Tensor:
        """`t`, or an InputError naming the adapter and tensor when it holds NaN or infinite values."""
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"adapter {self.path}: tensor {rec.name} holds {bad} NaN or infinite value(s), so every "
                             "merge with it would too; the adapter is damaged (or its training diverged): retrain it "
                             "or use an earlier checkpoint")
        return t

    def delta(self, module: str) -> torch.Tensor:
        """dW = s * B @ A (transposed for embedding LoRA and fan_in_fan_out), float32, shaped like the weight."""
        m = self.modules[module]
        a, b = self.factors(module)
        d = (b @ a).mul_(m.scaling)
        return d.T.contiguous() if m.transpose else d

    # ---- provenance ------------------------------------------------------------
    @property
    def base_name(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def recorded_base_fingerprint(self) -> Optional[str]:
        """The base fingerprint `medmerge train` recorded next to the adapter, if any."""
        return recorded_base_fingerprint(self.path)


def _dtype_code(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def peft_lora_config(base_path, ranks: dict[str, int], *, task_type: str = "CAUSAL_LM", fan_in_fan_out: bool = False,
                     modules_to_save=None) -> dict:
    """PEFT's adapter_config.json for LoRA factors whose scaling is 1 (lora_alpha = r; the most common rank as
    `r`, the others through rank_pattern/alpha_pattern, whose keys PEFT reads as regexes)."""
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": str(base_path), "r": common,
        "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "lora_dropout": 0.0, "target_modules": sorted(ranks), "bias": "none", "fan_in_fan_out": bool(fan_in_fan_out),
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": modules_to_save, "use_dora": False,
    }
