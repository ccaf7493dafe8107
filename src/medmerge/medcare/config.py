"""`medmerge medcare` configuration: the modules' sizes and each stage's data and training settings.

Defaults are the MedCare paper's (arXiv 2406.17484): attention LoRA r 16 / alpha 32 /
dropout 0.05 on q, k, v, o; on gate, up, down a knowledge aggregator of rank 32 and
8 routed noise experts of rank 16, top 2, s = 2; in stage 2 an alignment module of
rank 32 and the orthogonality weight lambda = 0.5 (the published README's scripts use 1.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError
from ..settings import Strict, apply_overrides, read_yaml, validation_message
from ..training.config import DataConfig, Finite, Seed, TrainingSettings

class AttentionSettings(Finite):
    r: int = Field(16, ge=1)
    alpha: float = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class FFNSettings(Finite):
    target_modules: list[str] = ["gate_proj", "up_proj", "down_proj"]
    knowledge_rank: int = Field(32, ge=1)
    noise_experts: int = Field(8, ge=1)
    noise_rank: int = Field(16, ge=1)
    top_k: int = Field(2, ge=1)
    scaling: float = 2.0  # s, for the knowledge aggregator, the noise experts and the alignment module
    dropout: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.top_k > self.noise_experts:
            raise ValueError(f"top_k={self.top_k} is more than noise_experts={self.noise_experts}")
        return self


class ModuleSettings(Strict):
    attention: AttentionSettings = AttentionSettings()
    ffn: FFNSettings = FFNSettings()


class AlignmentSettings(Finite):
    rank: int = Field(32, ge=1)
    lambda_: float = Field(0.5, ge=0, alias="lambda")  # NLL + lambda * sum |A_KA A_AM^T|_1
    keep_noise: bool = False  # ablation: keep the router and noise experts (trainable) in stage 2


class MedCareData(DataConfig):
    """One data set of a stage: the trainer's data section plus its objective and an optional k-shot subset."""

    stage: Literal["sft", "pt"] = "sft"  # sft: loss on assistant tokens; pt: on every token (plain text)
    k_shot: Optional[int] = Field(None, ge=1)


class _StageCommon(Strict):
    data: list[MedCareData] = Field(min_length=1)
    seed: Seed = 0
    chat_template: Optional[str] = None
    max_seq_length: int = Field(512, ge=8)
    packing: bool = True
    training: TrainingSettings = TrainingSettings()


class Stage1Config(_StageCommon):
    model: Path  # the model to adapt (e.g. the general instruct model)
    modules: ModuleSettings = ModuleSettings()


class Stage2Config(_StageCommon):
    stage1: Path  # the stage-1 run folder
    model: Optional[Path] = None  # the base model; default: the one stage 1 recorded (checked by fingerprint)
    alignment: AlignmentSettings = AlignmentSettings()


def load_stage_config(kind: str, path: str | Path | None, overrides=(), raw: Optional[dict] = None):
    """Stage1Config or Stage2Config from YAML (+ KEY=VALUE overrides); relative paths from the file's folder."""
    model = {"stage1": Stage1Config, "stage2": Stage2Config}[kind]
    base = Path(".")
    if raw is None:
        path = Path(path)
        raw = read_yaml(path, f"medcare {kind} config")
        base = path.parent
    raw = apply_overrides(dict(raw), list(overrides))
    if isinstance(raw.get("data"), dict):
        raw["data"] = [raw["data"]]
    try:
        cfg = model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path or 'config'}: invalid medcare {kind} config: {validation_message(e)}") from None

    def absolute(p: Optional[Path]) -> Optional[Path]:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cfg.model = absolute(cfg.model)
    if isinstance(cfg, Stage2Config):
        cfg.stage1 = absolute(cfg.stage1)
    for d in cfg.data:
        d.path = absolute(d.path)
    return cfg
