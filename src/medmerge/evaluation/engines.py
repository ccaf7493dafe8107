"""Evaluation engines: lm-eval's HF backend (default) or its vLLM backend (`--engine vllm`, a CUDA GPU).

vLLM is optional (`pip install 'medmerge[vllm]'`, best in its own environment: it pins its own torch) and is
checked before anything is loaded: the package, a CUDA device, the options' domains. lm-eval's `VLLM` wrapper
builds one `vllm.LLM` engine per evaluation; a sweep builds one for the whole run and pushes each merge's
weights into it (`push_weights`) instead of loading a model per point:

- the engine is started with `worker_extension_cls` = `medmerge.evaluation.vllm_worker.WeightLoader` (vLLM >=
  0.8.0), which gives every worker a `medmerge_load_weights(path)` method;
- the merged state dict is written in chunks of at most `chunk_bytes` to a safetensors file (in /dev/shm when it
  has room) and each chunk is loaded by every worker through `LLM.collective_rpc` (the model's own
  `load_weights`: Hugging Face names, with vLLM's fusing of q/k/v and gate/up and its tensor-parallel sharding);
- the prefix cache is reset afterwards (it holds keys and values computed with the old weights).

Live updates need one engine: lm-eval's data parallelism (`data_parallel` > 1) starts a new engine per call
through Ray, so a sweep refuses it. Untested on a GPU so far (no GPU machine was available): see
docs/evaluation.md.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import save_file

from ..errors import MedmergeError

ENGINES = ("hf", "vllm")
WORKER_EXTENSION = "medmerge.evaluation.vllm_worker.WeightLoader"
LOAD_METHOD = "medmerge_load_weights"


@dataclass(frozen=True)
class VllmOptions:
    """lm-eval's vLLM backend options that medmerge passes through (its names, with vLLM's meaning)."""

    tensor_parallel: int = 1  # GPUs per engine (vLLM's tensor_parallel_size)
    data_parallel: int = 1  # engines (lm-eval's data_parallel_size, through Ray); 1 for sweeps
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take
    max_model_len: Optional[int] = None  # context length (default: the model's)

    def check(self, *, live_updates: bool = False) -> None:
        for name in ("tensor_parallel", "data_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedmergeError(f"vllm {name} must be a whole number of at least 1, not {value!r}")
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g <= 1:
            raise MedmergeError(f"vllm gpu_memory_utilization must be in (0, 1], not {g!r}")
        m = self.max_model_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise MedmergeError(f"vllm max_model_len must be a whole number of tokens, not {m!r}")
        if live_updates and self.data_parallel > 1:
            raise MedmergeError("vllm data_parallel > 1 starts a new engine per evaluation (lm-eval runs it through "
                                "Ray), so a sweep cannot push each merge into it; use data_parallel 1 (and "
                                "tensor_parallel for several GPUs), or run one sweep worker per GPU")


def check_engine(engine: str, options: Optional[VllmOptions] = None, *, live_updates: bool = False,
                 device: str = "auto", adapter: bool = False) -> None:
    """Refuse an engine that cannot run here, before any model is loaded; say what to do."""
    if engine not in ENGINES:
        raise MedmergeError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "hf":
        return
    (options or VllmOptions()).check(live_updates=live_updates)
    if importlib.util.find_spec("vllm") is None:
        raise MedmergeError("--engine vllm needs the vllm package, which is not installed: pip install "
                            "'medmerge[vllm]' (a CUDA GPU machine; vLLM pins its own torch, so a separate "
                            "environment is best), or use --engine hf")
    if not torch.cuda.is_available():
        raise MedmergeError("--engine vllm needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() "
                            "is False). The PyPI vllm wheel is CUDA-only (CPU inference needs vLLM's +cpu wheels "
                            "or a source build); use --engine hf")
    if device == "cpu":
        raise MedmergeError("--engine vllm runs on CUDA GPUs; --device cpu asks for the CPU: use --engine hf, or "
                            "--device auto/cuda")
    if adapter and live_updates:
        raise MedmergeError("a sweep pushes full merged weights into vLLM; a PEFT adapter on top is not supported")


def load_vllm(model_path: Path, *, adapter_path: Optional[Path] = None, dtype: str = "auto", seed: int = 1234,
              batch_size: Any = "auto", options: Optional[VllmOptions] = None, live_updates: bool = False):
    """lm-eval's vLLM wrapper over a model folder (its `.model` is the `vllm.LLM` engine)."""
    from lm_eval.models.vllm_causallms import VLLM  # deferred: imports vllm

    o = options or VllmOptions()
    kwargs: dict[str, Any] = dict(pretrained=str(model_path), dtype=dtype, seed=seed, trust_remote_code=False,
                                  tensor_parallel_size=o.tensor_parallel, data_parallel_size=o.data_parallel,
                                  gpu_memory_utilization=o.gpu_memory_utilization,
                                  batch_size="auto" if batch_size in (None, "auto") else int(batch_size))
    if o.max_model_len is not None:
        kwargs["max_model_len"] = o.max_model_len
    if adapter_path is not None:
        from peft import PeftConfig

        kwargs.update(lora_local_path=str(adapter_path), max_lora_rank=max(16, PeftConfig.from_pretrained(
            str(adapter_path)).r))
    if live_updates:
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
    return VLLM(**kwargs)


def _staging_dir(total_bytes: int) -> Path:
    """/dev/shm (memory, no disk writes) when it has room for a chunk, else the system's temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * total_bytes:
        return shm
    return Path(tempfile.gettempdir())


def weight_chunks(tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int):
    """Group (name, tensor) pairs into lists of at most chunk_bytes (a larger tensor goes alone)."""
    chunk, size = [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


def push_weights(engine, model: torch.nn.Module, *, chunk_bytes: int = 2 << 30) -> int:
    """Load `model`'s weights (Hugging Face names) into a running vLLM engine; return how many tensors.

    `engine` is a `vllm.LLM` started with WORKER_EXTENSION. Every state_dict entry is sent, tied ones under
    both names (vLLM's loaders skip lm_head when the config ties it).
    """
    tensors = list(model.state_dict().items())
    sent = 0
    with tempfile.TemporaryDirectory(prefix="medmerge-vllm-", dir=_staging_dir(chunk_bytes)) as tmp:
        for i, chunk in enumerate(weight_chunks(tensors, chunk_bytes)):
            path = Path(tmp) / f"chunk{i}.safetensors"
            save_file(_unshared(chunk), str(path))
            loaded = engine.collective_rpc(LOAD_METHOD, args=(str(path),))
            if any(n != len(chunk) for n in loaded):
                raise MedmergeError(f"vLLM loaded {loaded} of the {len(chunk)} tensors of chunk {i} on its workers")
            sent += len(chunk)
            path.unlink()
    if engine.reset_prefix_cache() is False:  # cached keys and values were computed with the old weights
        raise MedmergeError("vLLM could not reset its prefix cache after the weights changed (requests running?)")
    return sent


def _unshared(chunk: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU tensors for save_file, which refuses two names on one storage (tied weights): the second is copied."""
    out, seen = {}, set()
    for name, tensor in chunk:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
