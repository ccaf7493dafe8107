"""`medmerge eval`: lm-evaluation-harness on a local model, offline, with a documented results.json.

The engine is lm-eval 0.4.13 (its HF backend, task format and IFEval checkers);
medmerge adds the local `mm_*` tasks (found through an include path), the generic
task files, input checks that fail before a model is loaded, and a results file
with plain metric names. `evaluate` is four steps: `check_request` (everything that
can be wrong, before loading), `load_lm`, `run_harness`, `results_record`.
Schema: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError, MedmergeError
from ..io.fingerprint import check_adapter_base, fingerprint
from ..io.folders import check_adapter, check_model
from ..io.writer import check_output
from ..runtime import library_versions, prepare_processes, resolve_device
from . import nltk_data
from .bootstrap import per_doc_scores
from .engines import VllmOptions, check_engine, load_vllm
from .registry import TaskPlan, plan_tasks
from .results import SCHEMA, convert_results, jsonable, unavailable_metrics, write_results

RECORDED_LIBRARIES = ("lm_eval", "torch", "transformers", "peft", "datasets", "rouge_score", "sacrebleu", "nltk")
QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers")
# a tokenizer's vocabulary, in one of the forms transformers loads without remote code
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "sentencepiece.bpe.model")
DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float", "float64")  # lm-eval: getattr(torch, dtype)
SEQ_LEN_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's resolve_max_length, in its order
# generation settings checked before loading (else they fail inside transformers' generate, mid-run):
# (smallest value, whether it may equal it, largest value or None), integers and numbers
GEN_INTS = {"max_gen_toks": 1, "min_new_tokens": 0, "top_k": 0, "num_beams": 1, "no_repeat_ngram_size": 0,
            "num_return_sequences": 1}
GEN_NUMBERS = {"temperature": (0.0, True, None), "top_p": (0.0, False, 1.0), "typical_p": (0.0, False, 1.0),
               "min_p": (0.0, True, 1.0), "repetition_penalty": (0.0, False, None), "length_penalty": (None, True, None)}
GEN_BOOLS = ("do_sample", "early_stopping")


def parse_gen_kwargs(text: Optional[str]) -> dict[str, Any]:
    """'temperature=0.7,do_sample=true,max_new_tokens=64' -> dict (max_new_tokens is lm-eval's max_gen_toks)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise MedmergeError(f"--gen-kwargs: {part!r} is not KEY=VALUE (e.g. temperature=0.7,max_new_tokens=64)")
        key, value = (s.strip() for s in part.split("=", 1))
        low = value.lower()
        parsed: Any
        if low in ("true", "false"):
            parsed = low == "true"
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out["max_gen_toks" if key == "max_new_tokens" else key] = parsed
    return out


@dataclass
class EvalRequest:
    """One evaluation, checked: resolved folders, the task plan, generation settings and the harness options."""

    model_path: Optional[Path]  # None: a loaded model was passed
    adapter_path: Optional[Path]
    plan: TaskPlan
    data_root: Optional[Path]
    device: str
    gen: dict
    include_paths: list = field(default_factory=list)
    limit: Optional[int | float] = None
    samples: Optional[dict[str, list[int]]] = None
    batch_size: int | str = 1
    dtype: str = "auto"
    seed: int = 1234
    chat_template: str = "auto"
    system_prompt: Optional[str] = None
    log_samples: bool = False
    base_check: Optional[str] = None  # what the adapter's same-base check found (or that it was skipped)
    engine: str = "hf"  # lm-eval's backend: hf or vllm (evaluation.engines)
    vllm: Optional[VllmOptions] = None


def check_gen_kwargs(gen: dict) -> None:
    """Each --gen-kwargs setting has a sound value and is one transformers' generate knows (lm-eval's `until` too)."""
    for key, value in gen.items():
        shown = "max_new_tokens" if key == "max_gen_toks" else key
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in GEN_INTS:
            if not isinstance(value, int) or isinstance(value, bool) or value < GEN_INTS[key]:
                raise MedmergeError(f"--gen-kwargs {shown}={value!r}: use an integer >= {GEN_INTS[key]}")
        elif key in GEN_NUMBERS:
            low, inclusive, high = GEN_NUMBERS[key]
            ok = number and (low is None or value > low or (inclusive and value == low)) \
                and (high is None or value <= high)
            if not ok:
                span = f" {'>=' if inclusive else '>'} {low}" if low is not None else ""
                raise MedmergeError(f"--gen-kwargs {shown}={value!r}: use a number{span}"
                                    f"{f' and <= {high}' if high is not None else ''}")
        elif key in GEN_BOOLS:
            if not isinstance(value, bool):
                raise MedmergeError(f"--gen-kwargs {shown}={value!r}: use true or false")
        elif key == "until":
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise MedmergeError(f"--gen-kwargs until={value!r}: use a stop string")
        elif key not in generation_keys():
            raise MedmergeError(f"--gen-kwargs {shown}: not a generation setting transformers knows; use e.g. "
                                "temperature, top_p, top_k, do_sample, repetition_penalty, max_new_tokens")


def generation_keys() -> set[str]:
    """Every setting of transformers' GenerationConfig (imported only when a less common setting is given)."""
    from transformers import GenerationConfig  # deferred: transformers takes seconds to import

    return set(GenerationConfig().to_dict())


def check_tokenizer(path: Path) -> None:
    """lm-eval loads the tokenizer from the model folder: fail now, naming what is missing, not inside transformers."""
    if any((path / f).is_file() for f in TOKENIZER_VOCAB_FILES) or any(path.glob("*.tiktoken")):
        return
    found = sorted(p.name for p in path.iterdir())
    raise InputError(
        f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)}; found: "
        f"{', '.join(found[:12])}{', ...' if len(found) > 12 else ''}); evaluating needs one: copy the tokenizer files "
        "(tokenizer.json or tokenizer.model, tokenizer_config.json, special_tokens_map.json) of the model it was "
        f"trained or merged from into {path}")


def check_batch_size(batch_size) -> None:
    text = str(batch_size)
    ok = (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1) or text == "auto" \
        or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 1)
    if not ok:
        raise MedmergeError(f"--batch-size {batch_size!r}: use a positive integer, auto or auto:N (N tries)")


SEED_MAX = 2**32 - 1  # numpy's seeds are unsigned 32-bit


def check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise MedmergeError(f"--seed {seed!r}: use a whole number from 0 to {SEED_MAX} (numpy's seed range)")


def check_limit(limit):
    """`limit` as lm-eval takes it: None, a fraction in (0, 1) of each task, or a whole number of documents."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise MedmergeError(f"--limit {limit!r}: use a fraction below 1 (a share of each task's documents) or a "
                            "whole number >= 1 (the first N documents); it must be a finite number above 0")
    if limit >= 1:
        if limit != int(limit):
            raise MedmergeError(f"--limit {limit!r}: a number of documents is a whole number; use {int(limit)} or "
                                f"{int(limit) + 1} (a fraction is below 1)")
        return int(limit)
    return float(limit)


def max_sequence_length(model_path: Path) -> Optional[tuple[int, str]]:
    """(length, config key) of the model's context as lm-eval reads it from config.json; None if it names none."""
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for where in (config.get("text_config"), config):
        if isinstance(where, dict):
            for key in SEQ_LEN_KEYS:
                if isinstance(where.get(key), int) and where[key] > 0:
                    return where[key], key
    return None


def check_generation_length(model_path: Path, plan: TaskPlan, gen: dict) -> None:
    """Tokens to generate must leave room for the prompt in the model's context (lm-eval asserts it mid-run)."""
    found = max_sequence_length(model_path)
    if found is None:
        return
    length, key = found
    asked = [("--gen-kwargs max_new_tokens", gen["max_gen_toks"])] if isinstance(gen.get("max_gen_toks"), int) else \
        [(f"task file {t.source}: max_new_tokens", t.max_new_tokens) for t in plan.task_files.values()]
    for what, n in asked:
        if n >= length:
            raise InputError(f"{what} is {n}, but the model {model_path} holds at most {length} tokens ({key} in its "
                             "config.json), prompt included; use a smaller max_new_tokens")


def check_request(model, tasks: Sequence[str], out: Optional[str | Path], *, peft=None, task_files=(),
                  include_paths=(), data_dir=None, limit=None, samples=None, batch_size=1, device="auto",
                  dtype="auto", seed=1234, gen_kwargs=None, chat_template="auto", system_prompt=None,
                  log_samples=False, force=False, allow_pickle=False, plan=None, base_check=True, engine="hf",
                  vllm=None, prebuilt=False) -> EvalRequest:
    """Everything that can be wrong with an evaluation, found before a model is loaded.

    `base_check` (`--no-base-check` turns it off) refuses an adapter trained on another base than
    MODEL, as `medmerge adapters merge` does (`io.fingerprint.check_adapter_base`).
    """
    if chat_template not in ("auto", "none"):
        raise MedmergeError(f"--chat-template must be auto or none, not {chat_template!r}")
    vllm = (vllm if isinstance(vllm, VllmOptions) else VllmOptions(**vllm)) if vllm else None
    if not prebuilt:  # a sweep's engine was checked (and started) once for the whole run
        check_engine(engine, vllm, device=device, adapter=peft is not None)
    if engine == "vllm" and not prebuilt and not isinstance(model, (str, Path)):
        raise MedmergeError("--engine vllm loads a model folder, not a model already loaded in memory")
    check_batch_size(batch_size)
    check_seed(seed)
    limit = check_limit(limit)
    if dtype not in DTYPES:
        raise MedmergeError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    device = resolve_device(device)
    gen = parse_gen_kwargs(gen_kwargs) if isinstance(gen_kwargs, (str, type(None))) else dict(gen_kwargs)
    if "max_new_tokens" in gen:
        gen["max_gen_toks"] = gen.pop("max_new_tokens")
    check_gen_kwargs(gen)
    loaded = not isinstance(model, (str, Path))
    model_path = None if loaded else check_model(model, allow_pickle)
    if model_path is not None:
        check_tokenizer(model_path)
    adapter_path = base_note = None
    if peft is not None:
        if loaded:
            raise MedmergeError("--peft needs a model folder, not a loaded model: load the adapter onto the model first")
        adapter_path = check_adapter(peft, model_path, allow_pickle)
        if base_check:
            base_note = check_adapter_base(model_path, adapter_path) or \
                f"adapter {adapter_path}: its recorded base fingerprint matches {model_path}"
        else:
            base_note = "skipped (--no-base-check)"
    data_root = Path(data_dir).expanduser() if data_dir else (Path(os.environ["MEDMERGE_DATA"]) if os.environ.get("MEDMERGE_DATA") else None)
    if out is not None:  # OUT is replaced with --force: it must not be, hold or lie inside anything read here
        check_output(Path(out).absolute(), force, [model_path, adapter_path, data_root, *task_files, *include_paths])
    nltk_data.activate()
    if plan is None:
        plan = plan_tasks(tasks, task_files, data_root, include_paths)
    if model_path is not None:
        check_generation_length(model_path, plan, gen)
    if samples is not None and limit is not None:
        raise MedmergeError("pass either limit or samples (chosen documents per task), not both")
    return EvalRequest(model_path=model_path, adapter_path=adapter_path, plan=plan, data_root=data_root,
                       device=device, gen=gen, include_paths=list(include_paths), limit=limit, samples=samples,
                       batch_size=batch_size, dtype=dtype, seed=seed, chat_template=chat_template,
                       system_prompt=system_prompt, log_samples=log_samples, base_check=base_note, engine=engine,
                       vllm=vllm)


def load_lm(model, tokenizer, req: EvalRequest):
    """lm-eval's HF model wrapper around a folder (with its adapter) or an already loaded model; or its vLLM one."""
    if req.engine == "vllm":
        return load_vllm(req.model_path, adapter_path=req.adapter_path, dtype=req.dtype, seed=req.seed,
                         batch_size=req.batch_size, options=req.vllm)
    from lm_eval.models.huggingface import HFLM  # deferred: lm-eval and transformers take seconds to import

    if req.model_path is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=req.batch_size)
    lm = HFLM(pretrained=str(req.model_path), peft=str(req.adapter_path) if req.adapter_path else None,
              device=req.device, batch_size=req.batch_size, dtype=req.dtype, trust_remote_code=False)
    return shard_across_processes(lm)


def shard_across_processes(lm):
    """Under `accelerate launch` with several processes, each evaluates its share of the documents.

    lm-eval's HF backend shards documents across processes only when it counts accelerator devices (GPUs);
    on CPU processes (`accelerate launch --cpu`, gloo) it leaves every process evaluating everything. This
    sets the same rank and world size that it sets on GPUs (the global process index, so that several
    nodes shard too); lm-eval then gives process r the documents r, r + N, ... and gathers the per-document
    results on rank 0, which alone computes the metrics.
    """
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1 and lm.world_size == 1:
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    return lm


def run_harness(lm, req: EvalRequest, apply_template: bool, *, quiet: bool = False) -> dict:
    """lm-eval's simple_evaluate with every seed set from the request; lm-eval's failures say what to do."""
    import lm_eval.evaluator  # deferred: lm-eval takes seconds to import
    from lm_eval import simple_evaluate

    # lm-eval shells out to `git describe` for *its caller's* repo and lets git print
    # "fatal: not a git repository" outside one; medmerge records library versions instead.
    git_hash, lm_eval.evaluator.get_git_commit_hash = lm_eval.evaluator.get_git_commit_hash, lambda: None
    plan = req.plan
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            return simple_evaluate(
                model=lm, tasks=plan.specs, task_manager=plan.task_manager(), limit=req.limit, samples=req.samples,
                gen_kwargs=req.gen or None, apply_chat_template=apply_template,
                system_instruction=req.system_prompt, log_samples=req.log_samples, random_seed=req.seed,
                numpy_random_seed=req.seed, torch_random_seed=req.seed, fewshot_random_seed=req.seed,
                bootstrap_iters=1000,
            )
    except MedmergeError:
        raise
    except Exception as e:  # lm-eval's own failures: say which task and how to proceed
        if plan.needs_builtins and ("offline" in str(e).lower() or "hub" in str(e).lower() or "connect" in str(e).lower()):
            raise MedmergeError(
                f"an lm-eval built-in task tried to load its data from the Hugging Face hub ({e}); medmerge runs "
                "offline: use the shipped mm_* tasks, a --task-file over your local copy, or put the data set in "
                "the local Hugging Face datasets cache first"
            ) from e
        if isinstance(e, AssertionError) and "maximum sequence length" in str(e):
            raise MedmergeError(f"{e} Use a smaller max_new_tokens (--gen-kwargs max_new_tokens=N, or the task "
                                "file's max_new_tokens)") from e
        raise
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash


def results_record(raw: dict, req: EvalRequest, apply_template: bool) -> dict:
    """The results.json document (docs/evaluation.md) of one harness run."""
    converted = convert_results(raw)
    configs = raw.get("configs", {})
    plan = req.plan
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "path": str(req.model_path) if req.model_path else None,
            "sha256": fingerprint(req.model_path) if req.model_path else None,
            "peft": {"path": str(req.adapter_path), "sha256": fingerprint(req.adapter_path),
                     "base_check": req.base_check} if req.adapter_path else None,
            "chat_template": apply_template,
            "system_prompt": req.system_prompt,
        },
        "tasks": converted["tasks"],
        "stderr": converted["stderr"],
        "unavailable": unavailable_metrics(raw),
        "skipped": {name: {"reason": f"empty target {t.target!r} (skip_empty_targets: true)", "count": len(t.skipped),
                           "rows": list(t.skipped)} for name, t in plan.task_files.items() if t.skipped},
        "samples": {t: dict(v) for t, v in raw.get("n-samples", {}).items()},
        # with log_samples: per-document values of the metrics that are per-document means (bootstrap intervals)
        **({"per_doc": per_doc_scores(raw.get("samples", {}), converted["tasks"])} if req.log_samples else {}),
        "generation": {t: jsonable(c.get("generation_kwargs")) for t, c in configs.items()
                       if c.get("output_type") == "generate_until"},
        "config": {
            "tasks": plan.names, "task_files": {n: str(t.source) for n, t in plan.task_files.items()},
            "include_paths": [str(p) for p in req.include_paths],
            "data_dir": str(req.data_root) if req.data_root else None, "limit": req.limit,
            "samples": {t: len(v) for t, v in req.samples.items()} if req.samples else None,
            "batch_size": req.batch_size, "device": req.device, "dtype": req.dtype, "seed": req.seed,
            "gen_kwargs": req.gen or None, "chat_template": req.chat_template, "engine": req.engine,
            **({"vllm": asdict(req.vllm or VllmOptions())} if req.engine == "vllm" else {}),
            "num_fewshot": {t: c.get("num_fewshot") for t, c in configs.items()},
        },
        "task_versions": jsonable(raw.get("versions", {})),
        "versions": library_versions(*RECORDED_LIBRARIES),
    }


def evaluate(
    model: str | Path | Any,
    tasks: Sequence[str] = (),
    out: Optional[str | Path] = None,
    *,
    tokenizer: Any = None,
    peft: Optional[str | Path] = None,
    task_files: Sequence[str | Path] = (),
    include_paths: Sequence[str | Path] = (),
    data_dir: Optional[str | Path] = None,
    limit: Optional[int | float] = None,
    samples: Optional[dict[str, list[int]]] = None,
    batch_size: int | str = 1,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 1234,
    gen_kwargs: Optional[str | dict] = None,
    chat_template: str = "auto",
    system_prompt: Optional[str] = None,
    log_samples: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    verbose: bool = False,
    plan: Optional[TaskPlan] = None,
    quiet: bool = False,
    base_check: bool = True,
    engine: str = "hf",
    vllm: Optional[VllmOptions | dict] = None,
    lm: Any = None,
) -> dict:
    """Evaluate `model` (a local folder or a loaded transformers model) on `tasks`; write OUT/results.json.

    `quiet` hides lm-eval's per-request progress bars (callers with their own progress display).
    `samples` ({task: [doc index, ...]}, lm-eval's option) evaluates chosen documents instead of
    `limit`'s first ones. `plan` reuses a `plan_tasks` result (and its loaded task index) across calls.
    `engine` is lm-eval's backend, hf or vllm (`vllm`: its VllmOptions); `lm` is an lm-eval model already
    built (a sweep's running vLLM engine, whose weights the caller has set), used instead of loading one.
    Returns the results dict (also when `out` is None, in which case nothing is written).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    req = check_request(model, tasks, out, peft=peft, task_files=task_files, include_paths=include_paths,
                        data_dir=data_dir, limit=limit, samples=samples, batch_size=batch_size, device=device,
                        dtype=dtype, seed=seed, gen_kwargs=gen_kwargs, chat_template=chat_template,
                        system_prompt=system_prompt, log_samples=log_samples, force=force,
                        allow_pickle=allow_pickle, plan=plan, base_check=base_check, engine=engine, vllm=vllm,
                        prebuilt=lm is not None)
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    if lm is None:
        if req.model_path is not None and engine == "hf":
            prepare_processes(req.device)  # under `accelerate launch`/torchrun: shard the documents across processes
        lm = load_lm(model, tokenizer, req)
    apply_template = chat_template == "auto" and getattr(lm.tokenizer, "chat_template", None) is not None
    raw = run_harness(lm, req, apply_template, quiet=quiet)
    if raw is None:  # another process of a multi-process run: rank 0 gathered its documents and writes
        return {"rank": lm.rank, "world_size": lm.world_size}
    results = results_record(raw, req, apply_template)
    results["config"]["processes"] = lm.world_size
    # from the call up to writing: checks, model loading, evaluation, hashing (not the
    # interpreter's start-up, imports made before the call, or writing the files)
    results["wall_time_s"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_results(Path(out), results, raw.get("samples", {}) if log_samples else None, force)
    return results
