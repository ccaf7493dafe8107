"""Runs inside vLLM's worker processes (`worker_extension_cls`): load weights from a safetensors file.

Kept free of medmerge's other imports: vLLM imports it in every worker.
"""

from __future__ import annotations

import torch
from safetensors import safe_open


class WeightLoader:
    """Mixed into each vLLM worker; `LLM.collective_rpc("medmerge_load_weights", args=(path,))` calls it."""

    def medmerge_load_weights(self, path: str) -> int:
        """Load every tensor of `path` (Hugging Face names) through the model's own `load_weights`."""
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.model_runner.model.load_weights(weights=((name, f.get_tensor(name)) for name in names))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(names)
