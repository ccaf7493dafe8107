"""`medmerge medcare stage1|stage2`: the two MedCare training stages, on medmerge's trainer.

Stage 1 (knowledge aggregation): the model to adapt (e.g. a general instruct model)
gets attention LoRA and, on the FFN projections, the knowledge aggregator plus the
routed noise experts; it trains on knowledge-intensive and alignment data (loss on
assistant tokens; plain-text data sets train on every token).

Stage 2 (alignment): the stage-1 attention LoRA is merged into the base weights and
frozen, the router and noise experts are dropped, and an alignment module is added
next to the knowledge aggregator (which starts from stage 1's tensors). Both train
on alignment data with loss = NLL + lambda * sum |A_KA A_AM^T|_1.

Everything else is the trainer's: data formats, k-shot subsets, seeds, checkpoints
and --resume, train_log.jsonl (with `nll` and `orth_penalty` in stage 2), loss.png,
medmerge_train.json and the atomic output folder. The run folder holds the MedCare
tensors (medcare_model.safetensors) and medcare_config.json, not the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import InputError
from ..io.fingerprint import check_recorded_base, files_sha256, fingerprint
from ..io.folders import check_model
from ..training.config import DataConfig, TrainConfig
from ..training.trainer import TrainResult, train
from .config import MedCareData, Stage1Config, Stage2Config
from .layer import MedCareLinear
from .model import WEIGHTS_FILE, MedCareModel, build_from_run, read_run


def trainer_class():
    """transformers' Trainer with the orthogonality term added to the loss (and logged) when the model has one."""
    from transformers import Trainer  # deferred: transformers takes seconds to import

    class MedCareTrainer(Trainer):
        orth_lambda: float = 0.0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._aligned = [m for m in self.model.modules() if isinstance(m, MedCareLinear) and m.am_A is not None]
            self._sums = [0.0, 0.0, 0]  # nll, penalty, micro-batches since the last log

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self._aligned:
                penalty = torch.stack([m.last_penalty for m in self._aligned]).sum()
                for m in self._aligned:
                    m.last_penalty = None
                self._sums[0] += float(loss.detach())
                self._sums[1] += float(penalty.detach())
                self._sums[2] += 1
                loss = loss + self.orth_lambda * penalty
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._sums[2]:
                penalty = self._sums[1] / self._sums[2]  # every process computes the same penalty (all weights)
                if self.accelerator.num_processes > 1:
                    # this process's nll is its share of the global token mean, scaled by the process count;
                    # the logged loss is already reduced across processes: nll is what remains of it
                    logs["nll"] = round(logs["loss"] - self.orth_lambda * penalty, 6)
                else:
                    logs["nll"] = round(self._sums[0] / self._sums[2], 6)
                logs["orth_penalty"] = round(penalty, 6)
                self._sums = [0.0, 0.0, 0]
            super().log(logs, *args, **kwargs)

    return MedCareTrainer


def data_parts(data: Sequence[MedCareData], base: Path, *, seed: int, chat_template: Optional[str],
               max_seq_length: int, packing: bool, training, lora=None) -> list[TrainConfig]:
    """One trainer config per data set (its own stage, columns and k-shot subset), sharing the rest."""
    return [TrainConfig(stage=d.stage, model=base, data=DataConfig(**d.model_dump(exclude={"stage", "k_shot"})),
                        seed=seed, k_shot=d.k_shot, chat_template=chat_template, max_seq_length=max_seq_length,
                        packing=packing, training=training, lora=lora) for d in data]


def stage_parts(cfg: Stage1Config | Stage2Config, base: Path) -> list[TrainConfig]:
    return data_parts(cfg.data, base, seed=cfg.seed, chat_template=cfg.chat_template,
                      max_seq_length=cfg.max_seq_length, packing=cfg.packing, training=cfg.training)


def _load_base(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM  # deferred: transformers takes seconds to import

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _train_dtype(cfg: Stage1Config | Stage2Config) -> torch.dtype:
    return torch.bfloat16 if cfg.training.bf16 else torch.float32


def _run(cfg, parts: list[TrainConfig], out, make, stage: int, extra: dict, force, resume, progress,
         callbacks) -> TrainResult:
    """Train with `make()` -> MedCareModel as the model; save its tensors and medcare_config.json."""
    holder: dict[str, MedCareModel] = {}

    def build(_tc, _device):
        holder["mc"] = make()
        return holder["mc"].model

    def save(_model, folder: Path) -> None:
        holder["mc"].save(folder, extra=extra)

    klass = trainer_class()
    klass.orth_lambda = cfg.alignment.lambda_ if stage == 2 else 0.0
    title = ("MedCare stage 1: knowledge aggregation" if stage == 1 else
             f"MedCare stage 2: alignment (lambda {cfg.alignment.lambda_:g})")
    return train(parts[0], out, force=force, resume=resume, progress=progress, callbacks=callbacks,
                 data_parts=parts, build_model=build, save_model=save, trainer_class=klass,
                 record_extra={"stage": f"medcare-stage{stage}", "kind": "medcare", "title": title,
                               "medcare": extra},
                 log_keys=("nll", "orth_penalty"))


def run_stage1(cfg: Stage1Config, out: str | Path, *, force: bool = False, resume: bool = False,
               progress: bool = True, callbacks: tuple = ()) -> TrainResult:
    base = check_model(cfg.model)
    parts = stage_parts(cfg, base)
    extra = {"base": {"path": str(base), "fingerprint": fingerprint(base)}, "stage1": None,
             "config": cfg.model_dump(mode="json", by_alias=True)}

    def make() -> MedCareModel:
        return MedCareModel.stage1(_load_base(base, _train_dtype(cfg)), cfg.modules, cfg.seed, where=str(base))

    return _run(cfg, parts, out, make, 1, extra, force, resume, progress, callbacks)


def stage1_base(cfg: Stage2Config, info: dict) -> Path:
    """The base model of a stage-2 run: `model:` or the one stage 1 recorded, with stage 1's fingerprint."""
    recorded = info["base"]
    base = check_model(cfg.model or Path(recorded["path"]))
    check_recorded_base(base, recorded["fingerprint"], trained=f"stage 1 ({cfg.stage1})",
                        fix="point `model:` at that base")
    return base


def run_stage2(cfg: Stage2Config, out: str | Path, *, force: bool = False, resume: bool = False,
               progress: bool = True, callbacks: tuple = ()) -> TrainResult:
    info, tensors = read_run(cfg.stage1)
    if info["stage"] != 1:
        raise InputError(f"stage1: {cfg.stage1} is a stage-{info['stage']} run; give the stage-1 run folder")
    base = stage1_base(cfg, info)
    parts = stage_parts(cfg, base)
    extra = {"base": info["base"],
             "stage1": {"path": str(cfg.stage1), "sha256": files_sha256([cfg.stage1 / WEIGHTS_FILE])},
             "config": cfg.model_dump(mode="json", by_alias=True)}

    def make() -> MedCareModel:
        mc = build_from_run(_load_base(base, _train_dtype(cfg)), info, tensors, where=str(cfg.stage1))
        return mc.to_stage2(cfg.alignment, cfg.seed)

    return _run(cfg, parts, out, make, 2, extra, force, resume, progress, callbacks)


def load_run(run: str | Path, *, base: Optional[str | Path] = None, drop_noise: bool = False,
             dtype: torch.dtype = torch.float32) -> MedCareModel:
    """A saved stage-1 or stage-2 run as a MedCare model in memory (e.g. to evaluate it unfolded)."""
    run = Path(run)
    info, tensors = read_run(run)
    base_path = check_model(base or info["base"]["path"])
    check_recorded_base(base_path, info["base"]["fingerprint"], trained=str(run), fix="pass the right base")
    model = _load_base(base_path, dtype)
    mc = build_from_run(model, info, tensors, where=str(run))
    if drop_noise:
        for layer in mc.ffn_layers().values():
            layer.drop_noise_experts()
    model.eval()
    return mc
