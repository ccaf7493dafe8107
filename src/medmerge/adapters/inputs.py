"""What an adapter merge combines: the base and the LoRA adapters with their weights, opened and checked.

`open_inputs` checks everything before any tensor is computed: every adapter is plain
LoRA, every module exists in the base with the right shape, all adapters were trained on
this base (the fingerprint `medmerge train` records; else the base configs), and all
adapters have the same modules (or `allow_missing`). The opened `AdapterInputs` then give
each module's deltas dW_i = s_i B_i A_i and the merged weight W0 + sum_i w_i dW_i, which
both the merge and its verification compute from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import InputError
from ..io.checkpoint import Checkpoint, resolve_model_path
from ..io.fingerprint import check_adapter_base
from .combine import LINEAR_METHODS, combine
from .lora import CONFIG_NAME, LoraAdapter, LoraModule

RECORD_KEY = "adapter_merge"  # the key of an adapter merge's record in its medmerge.yml


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """'PATH:WEIGHT' -> (PATH, WEIGHT); a path without ':WEIGHT' gets weight 1.

    When the whole argument is an existing path it is the path (weight 1), even if it holds a ':'
    (a folder named `run-12:30`); give such a folder a weight as `run-12:30:0.5`.
    """
    if Path(str(text)).expanduser().exists():
        return str(text), 1.0
    path, sep, weight = str(text).rpartition(":")
    if not sep:
        return str(text), 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise InputError(f"--adapter {text!r}: the part after the last ':' must be a weight (e.g. sft:0.7)") from None


@dataclass
class AdapterInputs:
    """The opened base and adapters, with every check done."""

    base: Checkpoint
    adapters: list[LoraAdapter]
    weights: list[float]
    modules: dict[str, list[Optional[str]]]  # base tensor -> module name in each adapter (None: missing)
    notes: list[str] = field(default_factory=list)

    def deltas(self, target: str) -> list[Optional[torch.Tensor]]:
        """Each adapter's delta for base tensor `target`, in the weight's orientation (None: missing)."""
        return [None if m is None else a.delta(m) for a, m in zip(self.adapters, self.modules[target])]

    def first_module(self, target: str) -> LoraModule:
        """The module of the first adapter that has `target` (all share its orientation)."""
        return next(a.modules[m] for a, m in zip(self.adapters, self.modules[target]) if m is not None)

    def stacked_factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(A_cat, B_cat, transpose) with B_cat @ A_cat = sum_i w_i s_i B_i A_i: the `cat` factors.

        A_cat stacks the A_i (rank sum r_i); B_cat holds w_i s_i B_i side by side (the
        scalings are folded into the small factor). The weight's delta is B_cat @ A_cat,
        transposed when `transpose` (embedding LoRA, fan_in_fan_out).
        """
        As, Bs, transpose = [], [], False
        for a, m, w in zip(self.adapters, self.modules[target], self.weights):
            if m is None:
                continue
            fa, fb = a.factors(m)
            As.append(fa)
            Bs.append(fb.mul_(w * a.modules[m].scaling))
            transpose = a.modules[m].transpose
        return torch.cat(As, dim=0), torch.cat(Bs, dim=1), transpose

    def merged_weight(self, target: str, w0: torch.Tensor, method: str, density, seed: int) -> torch.Tensor:
        """W0 + the combined delta, in float32 (a fresh tensor; `w0` is not modified).

        The linear methods (exact, cat, svd) compute it as one fused W0 + B_cat @ A_cat
        (`addmm`): no per-adapter full-size delta is ever formed.
        """
        w0f = w0.to(torch.float32)
        if method in LINEAR_METHODS:
            a, b, transpose = self.stacked_factors(target)
            return torch.addmm(w0f, a.T, b.T) if transpose else torch.addmm(w0f, b, a)
        d = combine(self.deltas(target), self.weights, method, density, seed, module_name(target))
        return d.add_(w0f)

    def close(self) -> None:
        self.base.close()


def open_inputs(base: str | Path, adapters: Sequence[tuple[str | Path, float]], *, allow_missing: bool = False,
                allow_pickle: bool = False, check_base: bool = True) -> AdapterInputs:
    if not adapters:
        raise InputError("pass at least one --adapter PATH:WEIGHT")
    base_path = resolve_model_path(str(base))
    if (base_path / CONFIG_NAME).is_file():
        raise InputError(f"--base {base_path} is an adapter; pass the base model the adapters were trained on")
    ckpt = Checkpoint(base_path, allow_pickle=allow_pickle)
    opened = [LoraAdapter(p, allow_pickle=allow_pickle) for p, _ in adapters]
    weights = [float(w) for _, w in adapters]
    for w, (p, _) in zip(weights, adapters):
        if not math.isfinite(w):
            raise InputError(f"adapter {p}: weight {w} is not a finite number")
    inputs = AdapterInputs(ckpt, opened, weights, {})
    for a in opened:
        for m in a.modules.values():
            rec = ckpt.records.get(m.target)
            if rec is None:
                raise InputError(f"adapter {a.path} was trained for another base: its module {m.name} has no weight "
                                 f"{m.target} in {base_path} (pass the base model the adapter was trained on)")
            if tuple(rec.shape) != m.delta_shape:
                raise InputError(f"adapter {a.path} was trained for another base: module {m.name} gives a delta of "
                                 f"shape {list(m.delta_shape)} but {m.target} in {base_path} has shape "
                                 f"{list(rec.shape)} (pass the base model the adapter was trained on)")
            if not rec.torch_dtype.is_floating_point:
                raise InputError(f"{m.target} in {base_path} is {rec.dtype}, not floating point: quantised bases "
                                 "cannot take an exact delta; pass the unquantised base")
    for a in opened:
        for target in a.saved_base:
            if target not in ckpt.records or not torch.equal(a.saved_base_weight(target),
                                                             ckpt.read(target).to(torch.float32)):
                raise InputError(f"adapter {a.path} saves its own copy of {target} (PEFT's save_embedding_layers), "
                                 f"which differs from {base_path}'s (a resized vocabulary?): merge it with the base "
                                 "it saved, not as a LoRA delta")
    targets = sorted({m.target for a in opened for m in a.modules.values()})
    by_target = [{m.target: m.name for m in a.modules.values()} for a in opened]
    for t in targets:
        inputs.modules[t] = [bt.get(t) for bt in by_target]
        missing = [str(a.path) for a, m in zip(opened, inputs.modules[t]) if m is None]
        if missing and not allow_missing:
            raise InputError(f"module {t.removesuffix('.weight')} is in some adapters but not in {', '.join(missing)}; "
                             "the adapters target different modules. Pass --allow-missing to treat a missing module "
                             "as dW = 0")
    seen: dict[Path, int] = {}
    for j, a in enumerate(opened):
        i = seen.setdefault(a.path.resolve(), j)
        if i != j:  # legitimate (weights 1 and -1 cancel), but rarely meant: said in the summary and the record
            inputs.notes.append(f"adapter {a.path.resolve()} is given twice (as {adapters[i][0]} at weight "
                                f"{weights[i]:g} and as {adapters[j][0]} at weight {weights[j]:g}); its deltas add up "
                                f"to weight {weights[i] + weights[j]:g}")
    n_missing = sum(m is None for ms in inputs.modules.values() for m in ms)
    if n_missing:
        inputs.notes.append(f"--allow-missing: {n_missing} (adapter, module) pairs are missing and count as dW = 0")
    if check_base:
        inputs.notes += check_same_base(base_path, opened)
    return inputs


def check_same_base(base_path: Path, adapters: Sequence[LoraAdapter]) -> list[str]:
    """Raise when an adapter was trained on another base; return notes on what could be checked.

    The check is `io.fingerprint.check_adapter_base` (shared with `medmerge eval --peft`): the base
    fingerprint `medmerge train` recorded, else the adapter's `base_model_name_or_path`.
    """
    notes = []
    for a in adapters:
        note = check_adapter_base(base_path, a.path, recorded=a.recorded_base_fingerprint, base_name=a.base_name,
                                  fix="pass the base it was trained on (--no-base-check skips this check)")
        if note:
            notes.append(note)
    return notes


def module_name(target: str) -> str:
    return target.removesuffix(".weight")
