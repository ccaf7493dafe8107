"""`--engine vllm` and `eval.engine: vllm`: refused clearly where it cannot run; the weight push, checked on CPU.

vLLM needs a CUDA GPU, which CI never has. What runs here: every refusal (no vllm package, no GPU, bad options,
data parallelism in a sweep), the push of a merge's weights through the worker extension (chunks, names,
tied weights) into a stand-in engine, and a whole sweep whose "vLLM" engine is lm-eval's HF backend over its
own copy of the loaded model that receives nothing but the pushed weights: its scores must equal the hf
engine's for every point, so no tensor of any merge may be missed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.errors import MedmergeError
from medmerge.evaluation.engines import VllmOptions, check_engine, push_weights, weight_chunks
from medmerge.evaluation.vllm_worker import WeightLoader
from medmerge.tiny import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    return {"llama": make_model(root / "llama", arch="llama", seed=0, hidden=32, layers=2, vocab=64),
            "tied": make_model(root / "tied", arch="qwen2", seed=1, hidden=32, layers=2, vocab=64)}


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())


def test_vllm_is_refused_before_anything_is_loaded_when_it_cannot_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if importlib.util.find_spec("vllm") is None:
        code, text = _cli("eval", tiny["llama"], "--tasks", "mm_medqa", "--out", out, "--engine", "vllm")
        assert code == 2 and "pip install 'medmerge[vllm]'" in text and "--engine hf" in text
    code, text = _cli("eval", tiny["llama"], "--tasks", "mm_medqa", "--out", out, "--tensor-parallel", "2")
    assert code == 2 and "--tensor-parallel: vLLM options, for --engine vllm" in text
    code, text = _cli("eval", tiny["llama"], "--tasks", "mm_medqa", "--out", out, "--engine", "vlm")
    assert code == 2 and "--engine must be one of hf, vllm, not 'vlm'" in text
    assert not out.exists()

    # vllm installed, but no GPU: said, with the way out
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, text = _cli("eval", tiny["llama"], "--tasks", "mm_medqa", "--out", out, "--engine", "vllm")
    assert code == 2 and "needs a CUDA GPU" in text and "--engine hf" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MedmergeError, match="--device cpu asks for the CPU"):
        check_engine("vllm", VllmOptions(), device="cpu")
    with pytest.raises(MedmergeError, match="data_parallel > 1 starts a new engine per evaluation"):
        check_engine("vllm", VllmOptions(data_parallel=2), live_updates=True)
    with pytest.raises(MedmergeError, match="a PEFT adapter on top is not supported"):
        check_engine("vllm", VllmOptions(), live_updates=True, adapter=True)
    check_engine("vllm", VllmOptions(tensor_parallel=2, data_parallel=2))  # a plain evaluation may use Ray's DP


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel=0), "tensor_parallel must be a whole number of at least 1, not 0"),
    (dict(data_parallel=1.5), "data_parallel must be a whole number"),
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be in \(0, 1\], not 0"),
    (dict(gpu_memory_utilization=1.2), "gpu_memory_utilization must be in"),
    (dict(max_model_len=0), "max_model_len must be a whole number of tokens"),
])
def test_vllm_options_have_declared_domains(options, message):
    with pytest.raises(MedmergeError, match=message):
        VllmOptions(**options).check()


class FakeEngine:
    """A `vllm.LLM` stand-in: collective_rpc runs the real worker extension on `workers` fake workers, whose
    model's load_weights copies each named tensor into a Hugging Face model (as vLLM's loaders do by name)."""

    def __init__(self, target: torch.nn.Module, workers: int = 1):
        self.target, self.received, self.resets = target, [], 0
        params = dict(target.state_dict())

        def load_weights(weights):
            for name, tensor in weights:
                self.received.append(name)
                with torch.no_grad():
                    params[name].copy_(tensor)
            return {n for n in params}

        self.workers = [type("Worker", (WeightLoader,), {})() for _ in range(workers)]
        for w in self.workers:
            w.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=load_weights))

    def collective_rpc(self, method, args=()):
        return [getattr(w, method)(*args) for w in self.workers]

    def reset_prefix_cache(self):
        self.resets += 1
        return True


@pytest.mark.parametrize("arch", ["llama", "tied"])
def test_push_weights_sends_every_tensor_by_name_in_chunks(tiny, arch):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(str(tiny[arch]))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # a "merge": every tensor differs from the engine's
    target = AutoModelForCausalLM.from_pretrained(str(tiny[arch]))
    engine = FakeEngine(target, workers=2)
    sent = push_weights(engine, source, chunk_bytes=4096)  # tiny chunks: many files, one rpc each
    names = list(source.state_dict())
    assert sent == len(names) and sorted(engine.received) == sorted(names * 2)  # every worker got everything
    assert engine.resets == 1
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    if arch == "tied":
        assert source.config.tie_word_embeddings and "lm_head.weight" in names  # both names of one storage


def test_weight_chunks_respect_the_size_and_keep_big_tensors_whole():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 300, 5, 5])]  # float32: 4 bytes each
    chunks = [[name for name, _ in c] for c in weight_chunks(tensors, 100)]
    assert chunks == [["t0", "t1"], ["t2"], ["t3", "t4"]]


@pytest.mark.slow  # two sweeps of the sweep family
def test_a_sweep_through_a_live_engine_scores_every_point_like_the_hf_engine(sweep_family, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from medmerge.experiments.sweep import evaluator as ev_module
    from medmerge.experiments.sweep.run import run

    hf = run(sweep_family / "sweep.yaml", tmp_path / "hf", progress=False)
    engines_built = []

    def fake_load_vllm(model_path, *, dtype, seed, batch_size, options, live_updates):
        assert live_updates and options.data_parallel == 1
        copy = tmp_path / "engine_model"  # the engine's own copy of the loaded model: only pushes change it
        shutil.copytree(model_path, copy)
        lm = HFLM(pretrained=str(copy), device="cpu", batch_size=batch_size, dtype=dtype)
        engine = FakeEngine(lm.model)
        lm.model.collective_rpc, lm.model.reset_prefix_cache = engine.collective_rpc, engine.reset_prefix_cache
        engines_built.append(engine)
        return lm

    monkeypatch.setattr(ev_module, "check_engine", lambda *a, **k: None)
    monkeypatch.setattr(ev_module, "load_vllm", fake_load_vllm)
    live = run(sweep_family / "sweep.yaml", tmp_path / "vllm", overrides=["eval.engine=vllm"], progress=False)
    assert len(engines_built) == 1  # one engine for the whole sweep
    engine = engines_built[0]
    rows = {n: [json.loads(x) for x in (tmp_path / n / "sweep.jsonl").read_text().splitlines()] for n in ("hf", "vllm")}
    assert [r["label"] for r in rows["hf"]] == [r["label"] for r in rows["vllm"]]
    for a, b in zip(rows["hf"], rows["vllm"]):
        assert a["tasks"] == b["tasks"], a["label"]
    assert engine.resets == live["evaluations"]["run"] // 2 == 5  # a push per scored point (2 tasks each)
    assert hf["evaluations"]["run"] == live["evaluations"]["run"]


def test_load_vllm_passes_options_that_lm_evals_vllm_backend_takes(tiny, monkeypatch):
    """The keyword arguments match lm-eval 0.4.13's VLLM.__init__ (read from its source: importing it needs
    vllm); the two it does not name reach vllm.LLM through its **kwargs (model_args.update(kwargs))."""
    import ast
    import sys
    import types

    import lm_eval

    from medmerge.evaluation.engines import WORKER_EXTENSION, load_vllm

    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    tree = ast.parse(source.read_text())
    init = next(f for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "VLLM"
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    named = {a.arg for a in init.args.args} | {a.arg for a in init.args.kwonlyargs}
    assert init.args.kwarg is not None and "self.model_args.update(kwargs)" in source.read_text()

    built = {}
    fake = types.ModuleType("lm_eval.models.vllm_causallms")
    fake.VLLM = lambda **kw: built.update(kw) or SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    load_vllm(tiny["llama"], dtype="bfloat16", seed=7, batch_size=8, live_updates=True,
              options=VllmOptions(tensor_parallel=2, gpu_memory_utilization=0.8, max_model_len=4096))
    assert built == {"pretrained": str(tiny["llama"]), "dtype": "bfloat16", "seed": 7, "trust_remote_code": False,
                     "tensor_parallel_size": 2, "data_parallel_size": 1, "gpu_memory_utilization": 0.8,
                     "batch_size": 8, "max_model_len": 4096, "worker_extension_cls": WORKER_EXTENSION}
    assert set(built) - named == {"gpu_memory_utilization", "worker_extension_cls"}  # vllm.LLM's own names
    module, cls = WORKER_EXTENSION.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[cls]), cls) is WeightLoader  # the path vLLM's workers import
