"""Score merge points in memory: one loaded model, inputs read once, every result cached.

For each point the merge is written straight into the loaded model's parameters
(`InMemoryMerger.merge_into`); nothing is written to disk. Each (point, task)
result is cached under the hash of

    (merge config + the input models' content fingerprints,
     task name + task definition,
     the evaluated documents themselves,
     generation settings: gen kwargs, chat template, system prompt, seed, batch size, dtype, lm-eval version)

as one JSON file in the cache folder, written atomically, so a re-run or an
extended grid skips what is done, an interrupted sweep resumes, and several
worker processes can share one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...errors import ConfigError, InputError
from ...evaluation import nltk_data, runner
from ...evaluation.engines import VllmOptions, check_engine, load_vllm, push_weights
from ...evaluation.registry import plan_tasks, shipped_tasks
from ...io.checkpoint import Checkpoint
from ...io.fingerprint import fingerprint
from ...merging import InMemoryMerger
from ...runtime import resolve_device
from .points import Point, Roles, point_key


@dataclass
class Selection:
    """Which documents of each task to evaluate: `limit`'s first N (lm-eval's semantics) or chosen indices."""

    limit: Optional[float] = None
    samples: Optional[dict[str, list[int]]] = None
    label: str = "all"


@dataclass
class EvalStats:
    evaluated: int = 0  # (point, task) pairs run through the harness
    cached: int = 0  # (point, task) pairs read from the cache
    merges: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class Scored:
    point: Point
    config: dict
    key: str
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> metrics
    n_docs: dict[str, int] = field(default_factory=dict)
    per_doc: dict[str, dict] = field(default_factory=dict)  # task -> per-document values (bootstrap intervals)
    cached: bool = True
    seconds: float = 0.0
    selection: str = "all"


class SweepEvaluator:
    """Hold the inputs and one loaded model; score points on the evaluation tasks."""

    def __init__(self, models: dict[str, Path], *, roles: Roles, tasks: Sequence[str], eval_kwargs: dict,
                 cache_dir: Path, seed: int = 0, load: Optional[str] = None, dtype: Optional[str] = None,
                 device: str = "auto", allow_pickle: bool = False, limit: Optional[float] = None,
                 subset: Optional[int] = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: seconds to import

        self.roles, self.seed = roles, seed
        self.base_selection = {"limit": limit, "subset": subset}  # the sweep's documents (halving takes shares)
        for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.models = {r: Path(p) for r, p in models.items()}
        for role, path in self.models.items():
            if not (path / "config.json").is_file():
                raise InputError(f"model {role!r}: {path} is not a Hugging Face model folder (no config.json)")
        self.fingerprints = {r: fingerprint(p) for r, p in self.models.items()}
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stats = EvalStats()
        self.eval_kwargs = dict(eval_kwargs)
        self.engine = self.eval_kwargs.pop("engine", None) or "hf"
        vllm = VllmOptions(**(self.eval_kwargs.pop("vllm", None) or {}))
        if self.engine == "vllm":  # one engine for the whole sweep; each merge is pushed into it (_apply)
            check_engine("vllm", vllm, live_updates=True, device=device)
            device = "cpu"  # the GPU's memory is vLLM's: the merge target (a Hugging Face model) stays in RAM
        self.device = device = resolve_device(device)
        self.dtype = dtype or "float32"
        self.merger = InMemoryMerger({r: Checkpoint(p, allow_pickle=allow_pickle) for r, p in self.models.items()},
                                     device=torch.device(device))
        load = load or roles.general
        if load not in self.models:
            raise ConfigError(f"load: {load!r} is not one of the models {sorted(self.models)}")
        self.model = AutoModelForCausalLM.from_pretrained(
            str(self.models[load]), dtype=getattr(torch, self.dtype), trust_remote_code=False).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.models[load]))
        self.load = load
        self.eval_kwargs["device"] = device
        self.vllm_lm = None
        if self.engine == "vllm":
            self.vllm_lm = load_vllm(self.models[load], dtype=self.dtype, seed=self.eval_kwargs.get("seed", 1234),
                                     batch_size=self.eval_kwargs.get("batch_size"), options=vllm, live_updates=True)
            self.eval_kwargs.pop("device")
        nltk_data.activate()
        data_dir = self.eval_kwargs.get("data_dir")
        if data_dir is None and os.environ.get("MEDMERGE_DATA"):
            data_dir = Path(os.environ["MEDMERGE_DATA"])
        self.plan = plan_tasks(tasks, self.eval_kwargs.get("task_files", ()), data_dir,
                               self.eval_kwargs.get("include_paths", ()))
        self.tasks = list(self.plan.names)
        self._leaves, self._docs = self._load_docs()
        self._hashes: dict[tuple, tuple[str, int]] = {}
        self._gen_hash = self._generation_hash()

    # --- documents and hashes ---------------------------------------------------------------------------------

    def _load_docs(self) -> tuple[dict[str, list[str]], dict[str, list]]:
        """Each requested task's leaf tasks and every leaf's documents (to count and hash them)."""
        loaded = self.plan.task_manager().load(self.plan.specs)
        group_map = loaded.get("group_map", {})

        def leaves(name: str) -> list[str]:
            if name in group_map:
                return [leaf for child in group_map[name] for leaf in leaves(child)]
            return [name]

        out_leaves = {name: leaves(name) for name in self.tasks}
        docs = {}
        for name, task in loaded["tasks"].items():
            docs[name] = list(task.eval_docs)
        return out_leaves, docs

    def doc_count(self, task: str) -> int:
        return sum(len(self._docs[leaf]) for leaf in self._leaves[task])

    def leaf_counts(self, task: str) -> dict[str, int]:
        return {leaf: len(self._docs[leaf]) for leaf in self._leaves[task]}

    def _task_definition(self, task: str) -> str:
        if task in self.plan.task_files:
            tf = self.plan.task_files[task]
            return json.dumps({k: str(v) for k, v in vars(tf).items()}, sort_keys=True)
        path = shipped_tasks(self.plan.include_paths).get(task)
        return path.read_text() if path else task

    def _data_hash(self, task: str, sel: Selection) -> tuple[str, int]:
        """Hash and count of the documents `sel` picks from `task` (the same for every point: computed once)."""
        picked = None if sel.samples is None else tuple(tuple(sel.samples.get(leaf, ())) for leaf in self._leaves[task])
        key = (task, sel.limit, picked)
        if key not in self._hashes:
            self._hashes[key] = self._hash_documents(task, sel)
        return self._hashes[key]

    def _hash_documents(self, task: str, sel: Selection) -> tuple[str, int]:
        h = hashlib.sha256(self._task_definition(task).encode())
        n = 0
        for leaf in self._leaves[task]:
            docs = self._docs[leaf]
            if sel.samples is not None:
                idx = sel.samples.get(leaf, [])
            elif sel.limit is not None:
                k = int(math.ceil(sel.limit * len(docs))) if sel.limit < 1.0 else int(sel.limit)
                idx = range(min(k, len(docs)))
            else:
                idx = range(len(docs))
            h.update(leaf.encode())
            for i in idx:
                h.update(json.dumps(docs[i], sort_keys=True, default=str).encode())
                n += 1
        return h.hexdigest()[:16], n

    def _generation_hash(self) -> str:
        kw = self.eval_kwargs
        blob = {"gen": kw.get("gen_kwargs"), "chat_template": kw.get("chat_template", "auto"),
                "system_prompt": kw.get("system_prompt"), "seed": kw.get("seed"), "batch_size": kw.get("batch_size"),
                "dtype": self.dtype, "lm_eval": version("lm_eval"), "tokenizer": self._tokenizer_hash(),
                **({"engine": self.engine} if self.engine != "hf" else {})}  # vLLM's kernels: other numbers
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _tokenizer_hash(self) -> str:
        h = hashlib.sha256()
        folder = self.models[self.load]
        for name in sorted(os.listdir(folder)):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                h.update(name.encode() + (folder / name).read_bytes())
        return h.hexdigest()[:16]

    # --- selections -------------------------------------------------------------------------------------------

    def selection(self, *, limit: Optional[float] = None, subset: Optional[int] = None,
                  fraction: Optional[float] = None) -> Selection:
        """Documents to score: all, lm-eval's first `limit`, or a fixed seeded `subset` of each task.

        `fraction` (successive halving) takes that share of the selection; shares are nested (a
        smaller share is a prefix of a larger one), so a cheap rung's documents are in every later rung.
        """
        if subset is None and fraction is None:
            return Selection(limit=limit, label="all" if limit is None else f"limit {limit:g}")
        samples = {}
        for leaf, docs in self._docs.items():
            n = len(docs)
            if limit is not None:
                n = min(n, int(math.ceil(limit * n)) if limit < 1.0 else int(limit))
            order = list(range(n)) if subset is None else random.Random(f"{self.seed}:{leaf}").sample(range(len(docs)), len(docs))
            if subset is not None:
                n = min(n, subset)
            k = n if fraction is None else max(1, int(math.ceil(fraction * n)))
            samples[leaf] = sorted(order[:k])
        label = (f"subset {subset}" if subset is not None else "all" if limit is None else f"limit {limit:g}")
        if fraction is not None and fraction < 1.0:
            label += f" x {fraction:g}"
        return Selection(samples=samples, label=label)

    # --- scoring ----------------------------------------------------------------------------------------------

    def _cache_file(self, key: str, task: str, data_hash: str) -> Path:
        name = hashlib.sha256(f"{key}|{task}|{data_hash}|{self._gen_hash}".encode()).hexdigest()[:24]
        return self.cache_dir / f"{name}.json"

    def config_of(self, point: Point) -> dict:
        return point.merge_config(self.roles, self.seed, self.dtype)

    def score(self, point: Point, sel: Optional[Selection] = None) -> Scored:
        """Scores of `point` on every task under `sel`, from the cache where present."""
        sel = sel or Selection()
        config = self.config_of(point)
        key = point_key(config, self.fingerprints, always=(self.load,))
        out = Scored(point=point, config=config, key=key, selection=sel.label)
        missing = []
        for task in self.tasks:
            data_hash, n = self._data_hash(task, sel)
            out.n_docs[task] = n
            file = self._cache_file(key, task, data_hash)
            if file.is_file():
                record = json.loads(file.read_text())
                out.tasks.update(record["tasks"])
                out.per_doc.update(record.get("per_doc", {}))  # records cached before per-doc values: no interval
                self.stats.cached += 1
            else:
                missing.append((task, file, data_hash))
        if missing:
            started = time.perf_counter()
            self._apply(config)
            results = self._evaluate([t for t, _, _ in missing], sel)
            out.cached = False
            for task, file, data_hash in missing:
                rows = {name: results["tasks"][name] for name in [task, *self._leaves[task]] if name in results["tasks"]}
                if task not in rows:
                    raise InputError(f"task {task} returned no scores for {point.describe()}")
                per_doc = {name: results["per_doc"][name] for name in rows if name in results.get("per_doc", {})}
                record = {"task": task, "point": point.describe(), "config": config, "data_hash": data_hash,
                          "generation_hash": self._gen_hash, "n_docs": out.n_docs[task], "tasks": rows,
                          "per_doc": per_doc, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _write_atomic(file, record)
                out.tasks.update(rows)
                out.per_doc.update(per_doc)
                self.stats.evaluated += 1
            out.seconds = round(time.perf_counter() - started, 3)
        return out

    def _apply(self, config: dict) -> None:
        started = time.perf_counter()
        self.merger.merge_into(self.model, config, strict=True)
        if self.vllm_lm is not None:
            push_weights(self.vllm_lm.model, self.model)  # into the running engine: no model load per point
        self.stats.merges += 1
        self.stats.merge_seconds += time.perf_counter() - started

    def _evaluate(self, tasks: list[str], sel: Selection) -> dict:
        started = time.perf_counter()
        kw = dict(self.eval_kwargs)
        kw["limit"] = sel.limit if sel.samples is None else None
        plan = self.plan if tasks == self.tasks else plan_tasks(
            tasks, [self.plan.task_files[t].source for t in tasks if t in self.plan.task_files], self.plan.data_dir,
            self.plan.include_paths)
        kw.pop("task_files", None)
        samples = None
        if sel.samples is not None:
            samples = {leaf: sel.samples[leaf] for t in tasks for leaf in self._leaves[t]}
        res = runner.evaluate(self.model, tasks, None, tokenizer=self.tokenizer, samples=samples, plan=plan, quiet=True,
                              log_samples=True, lm=self.vllm_lm, **kw)
        self.stats.eval_seconds += time.perf_counter() - started
        return res

    def write_state(self, config: dict) -> None:
        """Put `config`'s merge into the loaded model (for callers that go on using it)."""
        self._apply(config)


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
