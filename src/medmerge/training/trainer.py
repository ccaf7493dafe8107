"""`medmerge train`: pt (packed causal LM) and sft (loss on responses only), full or LoRA, on HF Trainer.

One readable recipe: check everything (config, data, columns, k, adapters and
their base) -> load -> tokenise -> Trainer -> write the model or adapter,
tokenizer, resolved config, base fingerprint, train_log.jsonl and loss.png
into a temporary folder -> move it into place. Checkpoints live in
`OUT.medmerge-work/` so that `--resume` can continue an interrupted run.
Runs unchanged under `accelerate launch -m medmerge.cli train CONFIG`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError, InputError, MedmergeError
from ..io.fingerprint import check_recorded_base, files_sha256, fingerprint
from ..io.folders import check_adapter, check_model
from ..io.writer import atomic_output_dir, check_output
from ..runtime import library_versions, pyplot, resolve_device
from .config import TrainConfig, dump_config
from .data import PadCollator, build_examples, check_columns, read_records, select_k

RECORD = "medmerge_train.json"
LOG = "train_log.jsonl"
RECORDED_LIBRARIES = ("torch", "transformers", "peft", "accelerate")


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    seconds: float
    tokens_per_second: float
    record: dict = field(default_factory=dict)

    def summary(self) -> str:
        """'N steps in Ts (final loss L, R tokens/s) -> OUT' (what the training commands print)."""
        return (f"{self.steps} steps in {self.seconds:.1f}s (final loss {self.train_loss:.4f}, "
                f"{self.tokens_per_second:.0f} tokens/s) -> {self.out}")


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".medmerge-work")


def check_base(cfg: TrainConfig) -> Path:
    if (cfg.model / "adapter_config.json").is_file() and not (cfg.model / "config.json").is_file():
        raise InputError(
            f"model {cfg.model} is a PEFT adapter; give the base model as `model:` and the adapter as "
            "`after_adapter:` (a second stage trains a fresh adapter)"
        )
    return check_model(cfg.model)


def check_previous_adapter(cfg: TrainConfig, base_fp: str) -> Optional[dict]:
    """The first-stage adapter must belong to this base: its recorded fingerprint, else its module shapes."""
    if cfg.after_adapter is None:
        return None
    path = check_adapter(cfg.after_adapter, cfg.model)
    record_file = path / RECORD
    recorded = json.loads(record_file.read_text())["base"]["fingerprint"] if record_file.is_file() else None
    if recorded is not None:
        check_recorded_base(cfg.model, recorded, trained=f"adapter {path}",
                            fix="train both stages on the same base model")
    return {"path": str(path), "base_fingerprint": recorded, "merged_in": cfg.merge_after_adapter}


class LogCallback:
    """train_log.jsonl: step, loss, learning rate, tokens/s (from the Trainer's token count)."""

    def __init__(self, path: Path, extra_keys: Sequence[str] = ()):
        from transformers import TrainerCallback  # deferred: transformers takes seconds to import

        outer = self

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.on_log(state, logs or {})

        self.callback = _CB()
        self.path = path
        self.extra_keys = tuple(extra_keys)  # a recipe's own logged values (e.g. its loss terms)
        self.rows: list[dict] = []
        self._last = (time.perf_counter(), 0)

    def on_log(self, state, logs: dict) -> None:
        if "loss" not in logs:
            return
        now, seen = time.perf_counter(), int(logs.get("num_input_tokens_seen", state.num_input_tokens_seen or 0))
        dt = now - self._last[0]
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "loss": logs["loss"],
               "learning_rate": logs.get("learning_rate"), "tokens_seen": seen,
               "tokens_per_s": round((seen - self._last[1]) / dt, 1) if dt > 0 else None,
               **{k: logs[k] for k in self.extra_keys if k in logs}}
        self._last = (now, seen)
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """The rows of a run's train_log.jsonl (`path`: the file or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    if not path.is_file():
        raise InputError(f"{path}: no {LOG} (written by `medmerge train`)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_model(cfg: TrainConfig, device: str):
    from transformers import AutoModelForCausalLM  # deferred: transformers and peft take seconds to import

    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=dtype)
    if cfg.after_adapter is not None and cfg.merge_after_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(cfg.after_adapter)).merge_and_unload()
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.lora.target_modules if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules {missing} are not modules of {cfg.model}; its linear layers: "
                              f"{', '.join(linear)}")
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), use_rslora=cfg.lora.rslora,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # always a fresh adapter: nothing is loaded into it
    return model


def load_data(tokenizer, parts: Sequence[TrainConfig]) -> tuple[list[dict], dict, Optional[dict]]:
    """Tokenised examples of one or more data sets (each with its own stage, columns and k-shot subset).

    Returns (examples, data record, k-shot record); with several parts both records list one entry per part.
    """
    examples, data, shots = [], [], []
    for part in parts:
        rows = read_records(part.data)
        check_columns(rows, part)
        rows, chosen = select_k(rows, part)
        part_examples, stats = build_examples(tokenizer, rows, part)
        examples += part_examples
        data.append({"path": str(part.data.path), "sha256": files_sha256([part.data.path]), "stage": part.stage,
                     **stats})
        shots.append(None if chosen is None else {"k": part.k_shot, "seed": part.seed, "label": part.data.label,
                                                  "indices": chosen})
    if len(parts) == 1:
        return examples, data[0], shots[0]
    return examples, {"parts": data, "examples": len(examples)}, (shots if any(shots) else None)


def train(cfg: TrainConfig, out: str | Path, *, force: bool = False, resume: bool = False,
          progress: bool = True, callbacks: tuple = (), data_parts: Sequence[TrainConfig] = (),
          build_model: Optional[Callable] = None, save_model: Optional[Callable] = None,
          trainer_class: Optional[type] = None, record_extra: Optional[dict] = None,
          log_keys: Sequence[str] = ()) -> TrainResult:
    """Run one training stage described by `cfg` and write its result to `out`.

    Hooks for recipes built on this trainer (MedCare): `data_parts` trains on the union of several data
    sets (default: `cfg` alone); `build_model(cfg, device)` returns the model to train (default: the base,
    with a fresh LoRA adapter when `cfg.lora`); `save_model(model, folder)` writes it (default:
    `save_pretrained`); `trainer_class` replaces transformers' Trainer (e.g. to add a loss term);
    `record_extra` is merged into medmerge_train.json; `log_keys` are values the trainer logs that
    train_log.jsonl keeps besides loss, learning rate and tokens/s.
    """
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed  # deferred: seconds to import
    from transformers.trainer_callback import PrinterCallback

    out = Path(out).absolute()
    check_output(out, force)
    # --- every check before training starts --------------------------------------------------------
    base_path = check_base(cfg)
    base_fp = fingerprint(base_path)
    previous = check_previous_adapter(cfg, base_fp)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, data_record, k_shot_record = load_data(tokenizer, list(data_parts) or [cfg])
    device = resolve_device(cfg.training.device, flag="training.device")
    work = work_dir(out)
    if resume:
        checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            raise MedmergeError(f"--resume: no checkpoint in {work}; start without --resume")
        resume_from: Optional[str] = str(checkpoints[-1])
    else:
        if work.exists():
            shutil.rmtree(work)
        resume_from = None
    work.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # before the adapter is created: its random A init comes from the recorded seed
    model = (build_model or _load_model)(cfg, device)
    t = cfg.training
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, max_steps=t.max_steps, num_train_epochs=t.epochs,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        bf16=t.bf16, use_cpu=device == "cpu", seed=cfg.seed, data_seed=cfg.seed, report_to="none",
        include_num_input_tokens_seen="non_padding", disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False,
    )
    log = LogCallback(work / LOG, log_keys)
    if not resume and log.path.exists():
        log.path.unlink()
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=examples,
                                         data_collator=PadCollator(tokenizer.pad_token_id),
                                         callbacks=[log.callback, *callbacks])
    if not progress:
        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen
    if not trainer.is_world_process_zero():
        return TrainResult(out, trainer.state.global_step, output.training_loss, seconds, tokens / max(seconds, 1e-9))
    rows_logged = read_log(log.path) if log.path.exists() else []
    record = {
        "stage": cfg.stage,
        "kind": "lora_adapter" if cfg.lora else "full_model",
        "base": {"path": str(base_path), "fingerprint": base_fp},
        "after_adapter": previous,
        "data": data_record,
        "k_shot": k_shot_record,
        "result": {"steps": trainer.state.global_step, "train_loss": output.training_loss,
                   "seconds": round(seconds, 2), "tokens_seen": tokens,
                   "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None},
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "versions": library_versions(*RECORDED_LIBRARIES),
        **(record_extra or {}),
    }
    with atomic_output_dir(out, force=force) as tmp:
        if save_model is not None:
            save_model(model, tmp)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "train_config.yml").write_text(dump_config(cfg))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        shutil.copyfile(log.path, tmp / LOG) if log.path.exists() else (tmp / LOG).touch()
        if rows_logged:
            plot_loss(rows_logged, tmp / "loss.png", record.get("title")
                      or f"{cfg.stage} {'LoRA' if cfg.lora else 'full'}: {cfg.data.path.name}")
    shutil.rmtree(work, ignore_errors=True)
    loss = output.training_loss if output.training_loss is not None else math.nan
    return TrainResult(out, trainer.state.global_step, loss, seconds, record["result"]["tokens_per_s"] or 0.0, record)

