"""Merging without writing anything: state dicts in, state dict or module out.

`InMemoryMerger` reads each input once and keeps it in memory, so a sweep can
re-merge the same inputs with many configurations (methods, weights, densities)
and write the result straight into a loaded model's parameters.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

from .compute import merge_tensor
from .config import MergeConfig, parse_config
from ..errors import ConfigError
from .plan import MergePlan, ModelSource, StateDictSource, build_plan, input_refs


class InMemoryMerger:
    """Hold the input models; merge them under any config that names the same inputs.

    `models` maps each model reference used in the configs to a state dict (or
    any ModelSource, such as a `medmerge.io.checkpoint.Checkpoint`).
    """

    def __init__(self, models: Mapping[str, Union[Mapping[str, torch.Tensor], ModelSource]], device: Optional[torch.device] = None):
        self.sources: dict[str, ModelSource] = {}
        for ref, model in models.items():
            if isinstance(model, Mapping):
                model = StateDictSource(dict(model), label=ref)
            self.sources[ref] = model
        self.device = device
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def plan(self, config: Union[MergeConfig, dict, str]) -> MergePlan:
        cfg = config if isinstance(config, MergeConfig) else parse_config(config)
        refs, _ = input_refs(cfg)
        missing = [r for r in refs if r not in self.sources]
        if missing:
            raise ConfigError(f"config names model(s) {missing} that this merger does not hold: {sorted(self.sources)}")
        return build_plan(cfg, [_Cached(self, r) for r in refs])

    def merge(self, config) -> dict[str, torch.Tensor]:
        """The merged state dict (tensors in the output dtype)."""
        plan = self.plan(config)
        return {tp.name: merge_tensor(plan, tp, device=self.device, check_finite=False) for tp in plan.tensors}

    @torch.no_grad()
    def merge_into(self, module: torch.nn.Module, config, strict: bool = True) -> torch.nn.Module:
        """Write the merge into `module`'s parameters and buffers in place."""
        plan = self.plan(config)
        targets = dict(module.state_dict(keep_vars=True))
        for tp in plan.tensors:
            target = targets.get(tp.name)
            if target is None:
                if strict:
                    raise ConfigError(f"module has no parameter {tp.name!r}; pass strict=False to skip it")
                continue
            merged = merge_tensor(plan, tp, device=self.device, check_finite=False)
            if tuple(target.shape) != tuple(merged.shape):
                raise ConfigError(f"parameter {tp.name!r} has shape {list(target.shape)}, merge gives {list(merged.shape)}")
            target.data.copy_(merged)
        return module


class _Cached:
    """A source whose tensors are read once and then served from memory."""

    fresh_reads = False

    def __init__(self, merger: InMemoryMerger, ref: str):
        self._merger, self._ref = merger, ref
        source = merger.sources[ref]
        self.label, self.config, self.records = ref, source.config, source.records
        self.path = getattr(source, "path", None)

    def read(self, name, rows=None):
        key = (self._ref, name)
        cache = self._merger._cache
        if key not in cache:
            cache[key] = self._merger.sources[self._ref].read(name)
        t = cache[key]
        return t if rows is None else t[rows[0] : rows[1]]


def merge_state_dicts(config, state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One-shot in-memory merge: `state_dicts` maps each model reference in the config to its weights."""
    return InMemoryMerger(state_dicts).merge(config)
