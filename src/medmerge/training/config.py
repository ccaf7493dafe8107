"""`medmerge train` configuration: one YAML file plus `key=value` overrides (dotted keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..io.chat_templates import NAMED_TEMPLATES
from ..settings import Strict, apply_overrides, read_yaml, validation_message

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
# A random seed: every config that takes one (training, MedCare, sweeps, few-shot, pipelines) checks it up front.
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True)]


class Finite(Strict):
    """A config section whose floats must be finite numbers (.inf or .nan trains a NaN model)."""

    model_config = ConfigDict(allow_inf_nan=False)


class DataConfig(Strict):
    """Where the training data is and which columns mean what."""

    path: Path
    format: Literal["auto", "jsonl", "csv", "tsv", "json", "text"] = "auto"
    text: str = "text"  # pt: the document column (text files: one document per line)
    prompt: str = "prompt"  # sft: the instruction column
    response: str = "response"  # sft: the answer column
    messages: Optional[str] = None  # sft: a column of chat messages [{role, content}, ...] instead
    system: Optional[str] = None  # sft: a system prompt for every example
    label: Optional[str] = None  # a column to stratify the k-shot selection by
    prompt_template: Optional[str] = None  # e.g. "Findings: {findings}\nImpression:" built from columns


class LoraSettings(Finite):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      min_length=1)  # [] would make PEFT look for other targets and fail
    rslora: bool = False


class TrainingSettings(Finite):
    @model_validator(mode="after")
    def _steps(self):
        if self.max_steps == 0:
            raise ValueError("training.max_steps must be a positive number of steps, or -1 to train for `epochs`")
        return self

    max_steps: int = Field(-1, ge=-1)  # > 0 wins over epochs; -1: train for `epochs`
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                       "constant_with_warmup", "inverse_sqrt"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    bf16: bool = False
    threads: Optional[int] = Field(None, ge=1)  # torch CPU threads; set it deliberately when jobs share cores
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrainConfig(Finite):
    stage: Literal["pt", "sft"]
    model: Path  # the base model folder (never an adapter)
    data: DataConfig
    seed: Seed = 0
    k_shot: Optional[int] = Field(None, ge=1)
    lora: Optional[LoraSettings] = None
    after_adapter: Optional[Path] = None  # a first-stage adapter: the new adapter is fresh, never a resumed one
    merge_after_adapter: bool = False  # train the fresh adapter on base + after_adapter merged in
    chat_template: Optional[str] = None  # None: the tokenizer's own (plain text if it has none); or a NAMED_TEMPLATES key
    max_seq_length: int = Field(512, ge=8)
    # sft examples longer than max_seq_length: "end" cuts them at the end (as TRL's keep_start: a long prompt loses
    # the answer, or the whole example); "prompt" first removes tokens from the middle of the prompt, keeping its
    # first and last 32 tokens and the whole answer with its end-of-turn token (long clinical dialogues)
    truncation: Literal["end", "prompt"] = "end"
    packing: bool = True  # pt: concatenate documents (EOS between) into max_seq_length blocks
    # full fine-tuning: parameters whose names match one of these globs (fnmatch, e.g. "model.embed_tokens.*",
    # "*.layers.0.*") are not trained; every pattern must match a parameter (tied weights match under both names)
    freeze: list[str] = []
    # full fine-tuning: embedding rows (input and output; one matrix when tied) of tokens that occur nowhere in this
    # stage's examples keep their values. Without it, the softmax's push-down gradient moves every row and Adam
    # scales even tiny gradients to full steps, so a fine-tune rewrites tokens it never sees (the chat tokens
    # during clinical pre-training, say), far more than a real fine-tune at a 100x smaller learning rate does
    freeze_unseen_tokens: bool = False
    training: TrainingSettings = TrainingSettings()

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v):
        if v is not None and v not in NAMED_TEMPLATES:
            raise ValueError(f"unknown chat_template {v!r}; use one of {', '.join(NAMED_TEMPLATES)} or leave it unset")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.after_adapter is not None and self.lora is None:
            raise ValueError("after_adapter needs a lora: section (the second stage trains a fresh adapter)")
        if self.merge_after_adapter and self.after_adapter is None:
            raise ValueError("merge_after_adapter needs after_adapter")
        if self.freeze_unseen_tokens and self.lora is not None:
            raise ValueError("freeze_unseen_tokens is for full fine-tuning; a LoRA adapter leaves the embeddings as "
                             "they are already")
        if self.freeze_unseen_tokens and self.training.weight_decay > 0:
            raise ValueError("freeze_unseen_tokens needs training.weight_decay 0: AdamW's decay would still shrink "
                             "the rows it keeps fixed")
        if self.freeze and self.lora is not None:
            raise ValueError("freeze is for full fine-tuning; with a lora: section the base weights are frozen already")
        if any(not p.strip() for p in self.freeze):
            raise ValueError("freeze: empty pattern; give parameter-name globs such as model.embed_tokens.*")
        return self


def load_config(path: str | Path | None, overrides: list[str] = (), raw: Optional[dict] = None) -> TrainConfig:
    """Read, override and validate; relative paths are taken from the config file's folder."""
    base = Path(".")
    if raw is None:
        path = Path(path)
        raw = read_yaml(path, "training config")
        base = path.parent
    raw = apply_overrides(dict(raw), list(overrides))
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(where + "invalid training config: " + validation_message(e))
    for attr in ("model", "after_adapter"):
        value = getattr(cfg, attr)
        if value is not None and not value.is_absolute():
            setattr(cfg, attr, (base / value).resolve())
    if not cfg.data.path.is_absolute():
        cfg.data.path = (base / cfg.data.path).resolve()
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
