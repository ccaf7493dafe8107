"""`medmerge eval`: lm-evaluation-harness on a local model, offline, with a documented results.json.

The engine is lm-eval 0.4.13 (its HF backend, task format and IFEval checkers);
medmerge adds the local `mm_*` tasks (found through an include path), the
generic task files, input checks that fail before a model is loaded, and a
results file with plain metric names. Schema: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError, MedmergeError
from ..io.fingerprint import file_sha256, model_files
from . import data, hooks, metrics, nltk_data
from .taskfile import TaskFile, load_task_file

TASKS_DIR = Path(__file__).parent / "tasks"
SCHEMA = "medmerge.eval/1"
log = logging.getLogger(__name__)


def _read_task_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


def shipped_tasks(include_paths: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Task and group names -> their YAML file: medmerge's mm_* tasks, then those of each include path.

    An include path is a folder of lm-eval task YAMLs (with their `!function` hooks);
    this is how other task suites, e.g. the synthetic clinical world's, plug in.
    """
    found = {}
    for path in sorted(TASKS_DIR.glob("mm_*.yaml")):
        spec = _read_task_yaml(path)
        found[spec.get("group") or spec["task"]] = path
    for folder in include_paths:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise MedmergeError(f"--include-path {folder} is not a folder of lm-eval task YAML files")
        for path in sorted(folder.rglob("*.yaml")):
            spec = _read_task_yaml(path)
            name = spec.get("group") or spec.get("task") if isinstance(spec, dict) else None
            if isinstance(name, str):
                found[name] = path
    return found


def group_members(name: str, include_paths: Sequence[str | Path] = ()) -> list[str]:
    spec = _read_task_yaml(shipped_tasks(include_paths)[name])
    return list(spec["task"]) if "group" in spec else [name]


# --- inputs --------------------------------------------------------------------------------------


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


def check_model(model: str | Path, allow_pickle: bool = False) -> Path:
    from ..io.checkpoint import Checkpoint, resolve_model_path

    path = resolve_model_path(str(model))
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise InputError(f"{path} is a PEFT adapter, not a model; pass the base model and --peft {path}")
        raise InputError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
    Checkpoint(path, allow_pickle=allow_pickle)  # weights present and their headers sound
    return path


def check_adapter(adapter: str | Path, model_path: Path, allow_pickle: bool = False) -> Path:
    """The adapter folder exists, loads without pickle, and each LoRA module fits the base's weight shape."""
    from safetensors import safe_open

    from ..io.checkpoint import Checkpoint

    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter folder {path} does not exist; pass the folder holding adapter_config.json")
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{path} has no adapter_config.json; pass a PEFT adapter folder")
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
            module = key.split(".lora_")[0]
            for prefix in ("base_model.model.",):
                if module.startswith(prefix):
                    module = module[len(prefix):]
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


@dataclass
class TaskPlan:
    names: list[str] = field(default_factory=list)  # requested names, in order
    specs: list[Any] = field(default_factory=list)  # what lm-eval loads: names and inline configs
    needs_builtins: bool = False
    task_files: dict[str, TaskFile] = field(default_factory=dict)
    include_paths: list[str] = field(default_factory=list)
    data_dir: Optional[Path] = None
    _manager: Any = None

    def task_manager(self):
        """lm-eval's TaskManager over medmerge's tasks (+ include paths; + built-ins only when asked: indexing them takes ~15 s)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(
                include_path=[str(TASKS_DIR), *self.include_paths], include_defaults=self.needs_builtins,
                metadata={"data_dir": str(self.data_dir) if self.data_dir else None},
            )
        return self._manager


def plan_tasks(tasks: Sequence[str], task_files: Sequence[str | Path], data_dir: Optional[Path],
               include_paths: Sequence[str | Path] = ()) -> TaskPlan:
    """Resolve task names before a model is loaded: shipped, include paths, task files, or lm-eval built-ins."""
    shipped = shipped_tasks(include_paths)
    plan = TaskPlan(include_paths=[str(p) for p in include_paths], data_dir=data_dir)
    for tf in task_files:
        task = load_task_file(tf)
        if task.name in shipped:
            raise MedmergeError(f"task file {tf}: name {task.name!r} is a shipped task; choose another name")
        plan.task_files[task.name] = task
    requested = list(dict.fromkeys([t.strip() for t in tasks if t.strip()] + list(plan.task_files)))
    if not requested:
        raise MedmergeError("no tasks: pass --tasks (e.g. mm_ifeval,mm_pubmedqa) or --task-file SPEC.yaml")
    builtin = []
    for name in requested:
        if name in plan.task_files:
            plan.specs.append(plan.task_files[name].lm_eval_config())
        elif name in shipped:
            plan.specs.append(name)
            for member in group_members(name, include_paths):
                loader = data.LOADERS.get(member)
                if loader is not None:
                    loader(data_dir)  # fail now, naming the file, rather than inside lm-eval
                elif member.startswith("mm_mmlu_"):
                    data.load_mmlu(member[len("mm_mmlu_"):], data_dir)
        else:
            builtin.append(name)
            plan.specs.append(name)
        plan.names.append(name)
    if builtin:
        plan.needs_builtins = True
        known = set(plan.task_manager().all_tasks)
        unknown = [b for b in builtin if b not in known]
        if unknown:
            raise MedmergeError(
                f"unknown task(s) {', '.join(unknown)}; shipped tasks: {', '.join(sorted(shipped))}; "
                "or any lm-eval built-in task (`medmerge tasks --all`), or --task-file SPEC.yaml"
            )
    return plan


# --- results ---------------------------------------------------------------------------------------


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def convert_results(raw: dict, plan: TaskPlan) -> dict[str, dict]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys -> {task: {metric: value}} and {task: {metric: stderr}}."""
    scores: dict[str, dict] = {}
    stderr: dict[str, dict] = {}
    for task, row in raw.get("results", {}).items():
        for key, value in row.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            if name.endswith("_stderr") or "_stderr," in name:
                if isinstance(value, (int, float)):
                    stderr.setdefault(task, {})[name.replace("_stderr", "")] = _plain(value)
                continue
            if isinstance(value, (int, float)):
                scores.setdefault(task, {})[name] = _plain(value)
    return {"tasks": scores, "stderr": stderr}


def unavailable_metrics(raw: dict, plan: TaskPlan) -> dict[str, dict[str, str]]:
    """Metrics a task declares but could not compute here, with the reason (METEOR without WordNet)."""
    out: dict[str, dict[str, str]] = {}
    for task, cfg in raw.get("configs", {}).items():
        declared = [m.get("metric") for m in cfg.get("metric_list", []) or []]
        if "meteor" not in declared:
            continue
        status = metrics.meteor_status()
        have = raw.get("results", {}).get(task, {})
        for m in ("meteor", "composite"):
            if m in declared and f"{m},none" not in have and not status.available:
                reason = status.reason if m == "meteor" else "METEOR, one of its parts, is unavailable: " + status.reason
                out.setdefault(task, {})[m] = reason
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def sample_records(task_samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples -> {doc, prompt, response, metrics} records."""
    out = []
    for s in task_samples:
        args = s.get("arguments") or []
        prompt = args[0][0] if args and isinstance(args[0], (list, tuple)) else None
        resps = s.get("filtered_resps") or []
        record: dict[str, Any] = {"doc_id": s.get("doc_id"), "doc": s.get("doc"), "prompt": prompt}
        if args and len(args) > 1 or (resps and isinstance(resps[0], (list, tuple))):
            # multiple choice: one (log-likelihood, is_greedy) per option
            lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
            options = [a[1] for a in args]
            best = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
            record["response"] = options[best] if best is not None else None
            record["option_loglikelihoods"] = dict(zip(options, lls))
            record["target"] = s.get("target")
        else:
            record["response"] = resps[0] if resps else None
            record["target"] = s.get("target")
        record["metrics"] = {m: hooks.sample_value(m, s.get(m)) for m in s.get("metrics", [])}
        out.append(_jsonable(record))
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("medmerge", "lm_eval", "torch", "transformers", "peft", "datasets", "rouge_score", "sacrebleu", "nltk"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# --- the run -------------------------------------------------------------------------------------------


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
) -> dict:
    """Evaluate `model` (a local folder or a loaded transformers model) on `tasks`; write OUT/results.json.

    `quiet` hides lm-eval's per-request progress bars (callers with their own progress display).
    `samples` ({task: [doc index, ...]}, lm-eval's option) evaluates chosen documents instead of
    `limit`'s first ones. `plan` reuses a `plan_tasks` result (and its loaded task index) across calls.
    Returns the results dict (also when `out` is None, in which case nothing is written).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    if chat_template not in ("auto", "none"):
        raise MedmergeError(f"--chat-template must be auto or none, not {chat_template!r}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise MedmergeError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if out is not None:
        from ..io.writer import check_output

        check_output(Path(out).absolute(), force)
    gen = parse_gen_kwargs(gen_kwargs) if isinstance(gen_kwargs, (str, type(None))) else dict(gen_kwargs)
    if "max_new_tokens" in gen:
        gen["max_gen_toks"] = gen.pop("max_new_tokens")

    loaded = not isinstance(model, (str, Path))
    model_path = None if loaded else check_model(model, allow_pickle)
    adapter_path = None
    if peft is not None:
        if loaded:
            raise MedmergeError("--peft needs a model folder, not a loaded model: load the adapter onto the model first")
        adapter_path = check_adapter(peft, model_path, allow_pickle)
    data_root = Path(data_dir).expanduser() if data_dir else (Path(os.environ["MEDMERGE_DATA"]) if os.environ.get("MEDMERGE_DATA") else None)
    nltk_data.activate()
    if plan is None:
        plan = plan_tasks(tasks, task_files, data_root, include_paths)
    if samples is not None and limit is not None:
        raise MedmergeError("pass either limit or samples (chosen documents per task), not both")

    if not verbose:
        for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if loaded:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=str(model_path), peft=str(adapter_path) if adapter_path else None, device=device,
                  batch_size=batch_size, dtype=dtype, trust_remote_code=False)
    has_template = getattr(lm.tokenizer, "chat_template", None) is not None
    apply_template = chat_template == "auto" and has_template

    manager = plan.task_manager()
    import lm_eval.evaluator

    # lm-eval shells out to `git describe` for *its caller's* repo and lets git print
    # "fatal: not a git repository" outside one; medmerge records library versions instead.
    git_hash, lm_eval.evaluator.get_git_commit_hash = lm_eval.evaluator.get_git_commit_hash, lambda: None
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            raw = simple_evaluate(
                model=lm, tasks=plan.specs, task_manager=manager, limit=limit, samples=samples,
                gen_kwargs=gen or None, apply_chat_template=apply_template, system_instruction=system_prompt,
                log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=1000,
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
        raise
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
    converted = convert_results(raw, plan)
    configs = raw.get("configs", {})
    results = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "path": str(model_path) if model_path else None,
            "sha256": file_sha256(model_files(model_path)) if model_path else None,
            "peft": {"path": str(adapter_path), "sha256": file_sha256(model_files(adapter_path))} if adapter_path else None,
            "chat_template": apply_template,
            "system_prompt": system_prompt,
        },
        "tasks": converted["tasks"],
        "stderr": converted["stderr"],
        "unavailable": unavailable_metrics(raw, plan),
        "samples": {t: dict(v) for t, v in raw.get("n-samples", {}).items()},
        "generation": {t: _jsonable(c.get("generation_kwargs")) for t, c in configs.items()
                       if c.get("output_type") == "generate_until"},
        "config": {
            "tasks": plan.names, "task_files": {n: str(t.source) for n, t in plan.task_files.items()},
            "include_paths": [str(p) for p in include_paths],
            "data_dir": str(data_root) if data_root else None, "limit": limit,
            "samples": {t: len(v) for t, v in samples.items()} if samples else None, "batch_size": batch_size,
            "device": device, "dtype": dtype, "seed": seed, "gen_kwargs": gen or None,
            "chat_template": chat_template, "num_fewshot": {t: c.get("num_fewshot") for t, c in configs.items()},
        },
        "task_versions": _jsonable(raw.get("versions", {})),
        "versions": library_versions(),
    }
    # from the call up to writing: checks, model loading, evaluation, hashing (not the
    # interpreter's start-up, imports made before the call, or writing the files)
    results["wall_time_s"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_results(Path(out), results, raw.get("samples", {}) if log_samples else None, force)
    return results


def write_results(out: Path, results: dict, samples: Optional[dict], force: bool) -> None:
    from ..io.writer import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        if samples is not None:
            (tmp / "samples").mkdir()
            for task, rows in samples.items():
                with open(tmp / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
                    for record in sample_records(rows):
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
