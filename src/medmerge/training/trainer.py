"""`medmerge train`: pt (packed causal LM) and sft (loss on responses only), full or LoRA, on HF Trainer.

One readable recipe: check everything (config, data, columns, k, adapters and
their base) -> load -> tokenise -> Trainer -> write the model or adapter,
tokenizer, resolved config, base fingerprint, train_log.jsonl and loss.png
into a temporary folder -> move it into place. Checkpoints live in
`OUT.medmerge-work/` so that `--resume` can continue an interrupted run.
Runs unchanged under `accelerate launch -m medmerge.cli train CONFIG`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError, InputError, MedmergeError
from ..io.fingerprint import check_adapter_base, files_sha256, fingerprint, recorded_base_fingerprint
from ..io.folders import TOKENIZER_FILES, check_adapter, check_model
from ..io.records import read_jsonl
from ..io.writer import atomic_output_dir, check_output, output_lock
from ..runtime import library_versions, note, prepare_processes, process_rank, pyplot, resolve_device
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


RUN_RECORD = "medmerge_run.json"  # in the work folder: what an interrupted run was started with
RESUME_MAY_CHANGE = ("training.device", "training.threads")  # how to run, not what is trained


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".medmerge-work")


def _checkpoints(work: Path) -> list[Path]:
    found = [p for p in work.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a Trainer checkpoint cannot be resumed from (a run killed while writing it), or None when complete."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json has no global_step"
    except (OSError, ValueError):
        return "trainer_state.json is missing or not JSON"
    weights = [f for f in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
               if (folder / f).is_file()]
    if not weights:
        return "no model or adapter weights"
    if weights[0].endswith(".safetensors"):
        try:
            size = (folder / weights[0]).stat().st_size
            with open(folder / weights[0], "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size < 8 + n + end:
                return f"{weights[0]} is truncated"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{weights[0]} is not readable safetensors"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    return None


def resume_checkpoint(work: Path) -> Path:
    """The newest complete checkpoint in `work`; incomplete newer ones (a kill while saving) are skipped."""
    checkpoints = _checkpoints(work)
    if not checkpoints:
        raise MedmergeError(f"--resume: no checkpoint in {work}; start without --resume")
    for folder in reversed(checkpoints):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        note(f"--resume: skipping {folder.name}, which is incomplete ({problem}); it was being written when "
             "the run stopped")
    raise MedmergeError(f"--resume: no complete checkpoint in {work} (all {len(checkpoints)} were interrupted while "
                        "being written); start over with --force")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_matches(work: Path, started: dict) -> None:
    """Refuse --resume when the config, data or base differ from the interrupted run's, naming what differs."""
    record = work / RUN_RECORD
    if not record.is_file():
        note(f"--resume: {work} has no {RUN_RECORD} (an older medmerge started it); the config cannot be compared")
        return
    try:
        before = _flat(json.loads(record.read_text()))
    except ValueError:
        raise MedmergeError(f"--resume: {record} is not JSON; start over with --force") from None
    now = _flat(json.loads(json.dumps(started)))
    differ = sorted(k for k in set(before) | set(now)
                    if before.get(k) != now.get(k) and k.removeprefix("config.") not in RESUME_MAY_CHANGE)
    if differ:
        shown = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in differ[:8])
        raise MedmergeError(f"--resume: the run in {work} was started with a different configuration ({shown}"
                            f"{'; ...' if len(differ) > 8 else ''}); resume with the same config, or pass --force "
                            "(without --resume) to start over")


def check_base(cfg: TrainConfig) -> Path:
    if (cfg.model / "adapter_config.json").is_file() and not (cfg.model / "config.json").is_file():
        raise InputError(
            f"model {cfg.model} is a PEFT adapter; give the base model as `model:` and the adapter as "
            "`after_adapter:` (a second stage trains a fresh adapter)"
        )
    path = check_model(cfg.model)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"model {path} has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
                         "tokenizer.model, vocab.json); copy the tokenizer files of the model it came from into it")
    return path


def check_previous_adapter(cfg: TrainConfig, base_fp: str) -> Optional[dict]:
    """The first-stage adapter must belong to this base: its recorded fingerprint, else the fingerprint of the
    base its adapter_config.json names (when that is a local folder), and always its module shapes."""
    if cfg.after_adapter is None:
        return None
    path = check_adapter(cfg.after_adapter, cfg.model)
    recorded = recorded_base_fingerprint(path)
    said = check_adapter_base(cfg.model, path, recorded=recorded, fix="train both stages on the same base model")
    if said:
        note(said)
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
        if "loss" not in logs or not state.is_world_process_zero:  # every rank logs the same (reduced) loss
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
    return read_jsonl(path)  # a damaged line is an error naming the file and the line


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
    freeze_parameters(model, cfg.freeze, cfg.model)
    return model


def freeze_unseen_token_rows(model, examples: Sequence[dict]) -> int:
    """Keep the embedding rows of tokens absent from every example's input_ids fixed; return how many rows that is.

    The gradients of those rows are zeroed by a hook, so Adam's moments stay zero and the rows do not move
    (the config refuses weight decay with this option: AdamW's decay would still shrink them). Input and
    output embeddings are masked alike; a tied model has one matrix."""
    seen = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    for ex in examples:
        seen[torch.as_tensor(ex["input_ids"], dtype=torch.long)] = True
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None and m.weight.requires_grad}
    for weight in matrices.values():
        mask = seen.to(device=weight.device, dtype=weight.dtype).unsqueeze(1)
        if weight.shape[0] != mask.shape[0]:
            raise ConfigError(f"freeze_unseen_tokens: an embedding matrix has {weight.shape[0]} rows but the input "
                              f"embeddings have {mask.shape[0]}; untie or resize them first")
        weight.register_hook(lambda grad, mask=mask: grad * mask)
    return int((~seen).sum())


def freeze_parameters(model, patterns: Sequence[str], where: object = "the model") -> list[str]:
    """Stop training every parameter whose name matches one of `patterns` (fnmatch globs); return their names.

    Names are matched with tied duplicates included (lm_head.weight of a tied model freezes the shared
    embedding), and a pattern that matches nothing is an error naming a few of the model's parameters."""
    if not patterns:
        return []
    names = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    frozen: list[str] = []
    for pattern in patterns:
        hits = [(n, p) for n, p in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _ in names[:6])
            raise ConfigError(f"freeze: pattern {pattern!r} matches no parameter of {where}; its parameters are "
                              f"named like {sample}, ...")
        for n, p in hits:
            p.requires_grad_(False)
            frozen.append(n)
    return sorted(set(frozen))


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
    out = Path(out).absolute()
    inputs = [part.model for part in (cfg, *data_parts)] + [part.data.path for part in (cfg, *data_parts)] + \
        [cfg.after_adapter]
    check_output(out, force, inputs)  # never is, holds or lies inside the base, the data or the first adapter
    main = process_rank() == 0  # under `accelerate launch`/torchrun rank 0 owns OUT and its work folder
    with output_lock(out) if main else contextlib.nullcontext():  # one run per OUT: its checkpoints are shared too
        return _train(cfg, out, force=force, resume=resume, progress=progress, callbacks=callbacks,
                      data_parts=data_parts, build_model=build_model, save_model=save_model,
                      trainer_class=trainer_class, record_extra=record_extra, log_keys=log_keys, inputs=inputs,
                      main=main)


def check_process_split(cfg: TrainConfig, examples: int, processes: int, main: bool) -> int:
    """Under N processes each takes batch_size / N examples of every batch; refuse a batch that does not split.

    Returns how many examples each epoch repeats: accelerate completes a short last batch with examples from
    the epoch's start so that every process gets its share (DDP needs all of them in every step); said once.
    """
    if processes == 1:
        return 0
    b = cfg.training.batch_size
    if b % processes:
        raise ConfigError(f"training.batch_size {b} is the global batch, split across the {processes} processes: "
                          f"use a multiple of {processes} (e.g. {b + processes - b % processes})")
    short = examples % b
    if short and main:
        note(f"{examples} examples in batches of {b}: each epoch's last batch holds {short}, and accelerate "
             f"completes it with {b - short} examples from the epoch's start, which are seen twice; for exactly "
             f"one process's training use a data size (after k_shot and packing) that is a multiple of {b}")
    return b - short if short else 0


def check_finite_weights(model, out: Path, work: Path, loss: Optional[float]) -> None:
    """Refuse to write a model whose trained weights hold NaN or inf (a learning rate or weight decay that diverged).

    Only the trained tensors can have changed (the adapter's, or all of a full fine-tune's). The run's
    checkpoints are removed: resuming would continue the diverged run.
    """
    bad, total = [], 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            total += 1
            if not bool(torch.isfinite(param).all()):
                bad.append(name)
    if not bad:
        return
    shutil.rmtree(work, ignore_errors=True)
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    loss_said = f" (reported training loss {loss})" if loss is not None else ""
    raise MedmergeError(f"training diverged: {len(bad)} of {total} trained tensor(s) hold NaN or infinite values "
                        f"({shown}){loss_said}; nothing was written to {out} and the run's checkpoints were removed. "
                        "Lower training.lr (or training.weight_decay), keep training.max_grad_norm > 0, or use "
                        "float32 instead of bf16")


def _train(cfg: TrainConfig, out: Path, *, force, resume, progress, callbacks, data_parts, build_model, save_model,
           trainer_class, record_extra, log_keys, inputs, main) -> TrainResult:
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed  # deferred: seconds to import
    from transformers.trainer_callback import PrinterCallback

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
    processes = prepare_processes(device)
    repeated = check_process_split(cfg, len(examples), processes, main)
    work = work_dir(out)
    started = {"config": cfg.model_dump(mode="json"), "data": data_record, "k_shot": k_shot_record,
               "base_fingerprint": base_fp}
    if resume:
        resume_from: Optional[str] = str(resume_checkpoint(work))
        check_resume_matches(work, started)
    elif main:
        kept = _checkpoints(work) if work.is_dir() else []
        if kept and not force:
            raise MedmergeError(f"{work} holds the checkpoints of an interrupted run (up to {kept[-1].name}); pass "
                                "--resume to continue it, or --force to discard them and start over")
        if work.exists():
            if kept:
                note(f"--force: removing {work} ({len(kept)} checkpoint(s) of an earlier, interrupted run)")
            shutil.rmtree(work)
        resume_from = None
    else:
        resume_from = None
    if main:
        work.mkdir(parents=True, exist_ok=True)
        if not resume:
            (work / RUN_RECORD).write_text(json.dumps(started, indent=2) + "\n")
    if processes > 1:  # the other ranks start once rank 0 has cleared and prepared the work folder
        from accelerate import PartialState

        PartialState(cpu=device == "cpu").wait_for_everyone()
    set_seed(cfg.seed)  # before the adapter is created: its random A init comes from the recorded seed
    model = (build_model or _load_model)(cfg, device)
    unseen_rows = freeze_unseen_token_rows(model, examples) if cfg.freeze_unseen_tokens else None
    t = cfg.training
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, max_steps=t.max_steps, num_train_epochs=t.epochs,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        bf16=t.bf16, use_cpu=device == "cpu", seed=cfg.seed, data_seed=cfg.seed, report_to="none",
        include_num_input_tokens_seen="non_padding", disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False,
        # several processes split each batch of batch_size (accelerate's split_batches): the same config trains
        # the same model on any number of processes, every example once per epoch (tests/training/test_processes.py)
        **({"accelerator_config": {"split_batches": True}} if processes > 1 else {}),
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
    check_finite_weights(model, out, work, output.training_loss)
    rows_logged = read_log(log.path) if log.path.exists() else []
    record = {
        "stage": cfg.stage,
        "kind": "lora_adapter" if cfg.lora else "full_model",
        "frozen": sorted(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
        if cfg.freeze else [],
        **({"unseen_token_rows_frozen": unseen_rows} if unseen_rows is not None else {}),
        "base": {"path": str(base_path), "fingerprint": base_fp},
        "after_adapter": previous,
        "data": data_record,
        "k_shot": k_shot_record,
        "result": {"steps": trainer.state.global_step, "train_loss": output.training_loss,
                   "seconds": round(seconds, 2), "tokens_seen": tokens,
                   "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None},
        "seed": cfg.seed,
        # batch_size is the global batch: N processes take batch_size / N examples of each batch each
        "processes": {"count": processes, "per_process_batch": t.batch_size // processes,
                      "global_batch": t.batch_size * t.grad_accum, "examples_repeated_per_epoch": repeated},
        "config": cfg.model_dump(mode="json"),
        "versions": library_versions(*RECORDED_LIBRARIES),
        **(record_extra or {}),
    }
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
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

