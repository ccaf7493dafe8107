"""Declared contracts for merge kernels.

A merge method is a pure function of the input tensors of one output tensor
(already in the working dtype), the index of the base among them, and resolved
parameters. Its `MethodSpec` says what it needs, so a whole plan can be checked
before any tensor is read.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

REQUIRED = object()

GLOBAL = "global"  # one value per tensor, from the top-level `parameters`
PER_INPUT = "input"  # one value per input model, base included
PER_NON_BASE = "non_base"  # one value per input model other than the base


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Domain:
    """The values a numeric parameter may take: finite numbers in an interval (None: unbounded that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

    def __contains__(self, value: Any) -> bool:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(v):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or not (v > self.high or (self.high_open and v == self.high))

    def __str__(self) -> str:
        if not self.bounded:
            return "finite"
        low = "(-inf" if self.low is None else ("(" if self.low_open else "[") + _num(self.low)
        high = "inf)" if self.high is None else _num(self.high) + (")" if self.high_open else "]")
        return f"{low}, {high}"


FINITE = Domain()  # any finite number (the domain of every numeric parameter that declares none)
UNIT = Domain(0.0, 1.0)  # [0, 1]
FRACTION = Domain(0.0, 1.0, low_open=True)  # (0, 1]: a share kept (density)


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    scope: str = GLOBAL
    default: Any = REQUIRED
    choices: Optional[tuple] = None
    doc: str = ""
    domain: Domain | None = None  # numeric parameters: FINITE unless given
    unless: str | None = None  # a global bool parameter that, when true, lifts `domain` (finite values only)

    def __post_init__(self):
        if self.domain is None and self.type in (float, int):
            object.__setattr__(self, "domain", FINITE)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def domain_text(self) -> str:
        """' in (0, 1]', ' finite', ' in [0, 1] unless allow_extrapolation', ' one of a|b' or ''."""
        text = ""
        if self.domain is not None:
            text = f" in {self.domain}" if self.domain.bounded else " finite"
            if self.unless:
                text += f" unless {self.unless}"
        if self.choices is not None:
            text += " one of " + "|".join(map(str, self.choices))
        return text

    def coerce(self, value: Any, where: str, relaxed: bool = False) -> Any:
        """Validate one resolved value; `where` names the tensor and model.

        Numeric values must be finite and lie in `domain` (only finite when `relaxed`: the
        `unless` parameter is true).
        """
        try:
            if self.type is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, (bool, int)) or (
                    isinstance(value, int) and value not in (0, 1)
                ):
                    raise ValueError
                value = bool(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif self.type is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif self.type is str:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"parameter {self.name!r} for {where}: expected {self.type.__name__}, "
                f"got {value!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"parameter {self.name!r} for {where}: {value!r} is not one of "
                f"{', '.join(map(str, self.choices))}"
            )
        if self.domain is not None:
            domain = FINITE if relaxed else self.domain
            if value not in domain:
                if not domain.bounded:
                    raise ValueError(f"parameter {self.name!r} for {where}: {value!r} must be finite (a number, "
                                     "not nan or inf)")
                hint = f"; set `{self.unless}: true` to allow values outside it" if self.unless else ""
                raise ValueError(f"parameter {self.name!r} for {where}: {value!r} is outside {domain}, the values "
                                 f"it may take{hint}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    base: str = "ignored"  # "required" | "optional" | "ignored"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: int = 0
    max_non_base: Optional[int] = None
    random: bool = False  # draws random numbers (needs a seed)
    # Given resolved global and per-input parameters: does output[i] depend
    # only on input[*][i]? Then the executor may stream row chunks.
    elementwise: Callable[[dict, list], bool] = field(default=lambda g, m: False)
    formula: str = ""
    reference: str = ""
    # what one output tensor costs in memory beyond reading its inputs (`medmerge methods`, docs/methods.md)
    memory: str = "whole tensor"
    # Constraints between parameters, given the resolved global parameters and (model, parameters)
    # of every input: why they do not fit together, or None. Checked for every tensor at plan time.
    check: Callable[[dict, list], str | None] = field(default=lambda g, m: None)
    # calibration statistics each input must provide (`medmerge stats`: "gram" or "fisher"), named by the
    # per-model parameter `stats`; None: a data-free method
    stats: Optional[str] = None
    # whole-model statistics the kernel needs (PCB's quantiles): prepare(each, global params) -> dict, where
    # each() yields the TensorInputs of every tensor anew (one call per streaming pass); the result reaches the
    # kernel as `TensorInputs.globals`
    prepare: Optional[Callable[[Callable, dict], dict]] = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == GLOBAL)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope != GLOBAL)


@dataclass
class TensorInputs:
    """The inputs of one output tensor, in the working dtype."""

    tensors: list[torch.Tensor]
    base: Optional[int]  # index of the base model in `tensors`, or None
    model_params: list[dict]  # resolved per-input parameters, same order
    name: str = ""
    seed: Optional[int] = None
    # True when `tensors` are fresh working copies the kernel may overwrite
    # (streaming); False when the caller reuses them (in-memory sweeps).
    owned: bool = False
    # each input's statistics for this tensor (methods with `MethodSpec.stats`), same order; None: the tensor
    # has none (then such a method averages it)
    stats: Optional[list[torch.Tensor]] = None
    globals: Optional[dict] = None  # the plan's whole-model statistics (methods with `MethodSpec.prepare`)

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]

    def stream_seed(self, salt: object) -> int:
        """A seed for one random stream of this tensor: a function of (seed, tensor
        name, salt) only, so results never depend on execution order, threads or device."""
        return tensor_seed(self.seed or 0, f"{self.name}\x00{salt}")


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


Kernel = Callable[[TensorInputs, dict], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    spec: MethodSpec
    kernel: Kernel

    def __call__(self, inputs: TensorInputs, params: dict) -> torch.Tensor:
        return self.kernel(inputs, params)


def check_counts(spec: MethodSpec, n_inputs: int, has_base: bool) -> Optional[str]:
    """Return why `n_inputs` models (with or without a base) do not fit, or None."""
    if spec.base == "required" and not has_base:
        return f"method {spec.name!r} needs `base_model`; add one (the model the others were fine-tuned from)"
    n_non_base = n_inputs - int(has_base and spec.base != "ignored")
    if n_inputs < spec.min_inputs:
        return f"method {spec.name!r} needs at least {spec.min_inputs} input models (base included); got {n_inputs}"
    if spec.max_inputs is not None and n_inputs > spec.max_inputs:
        return f"method {spec.name!r} takes at most {spec.max_inputs} input models (base included); got {n_inputs}"
    if n_non_base < spec.min_non_base:
        return f"method {spec.name!r} needs at least {spec.min_non_base} models besides the base; got {n_non_base}"
    if spec.max_non_base is not None and n_non_base > spec.max_non_base:
        return f"method {spec.name!r} takes at most {spec.max_non_base} models besides the base; got {n_non_base}"
    return None


_BLOCK = 1024


def stable_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of all elements as a float64 scalar, independent of the thread count.

    A plain torch sum splits the reduction across threads, so its rounding depends
    on their number. Here each block of 1024 elements is summed by one thread in a
    fixed order, and the block sums are added in float64: as fast as a plain sum,
    deterministic, and more accurate.
    """
    x = x.reshape(-1)
    n = x.numel() // _BLOCK * _BLOCK
    block_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = x[:n].reshape(-1, _BLOCK).sum(dim=1, dtype=block_dtype).sum(dtype=torch.float64)
    if n < x.numel():
        total = total + x[n:].sum(dtype=torch.float64)
    return total


CHUNK = 1 << 22  # elements per step of chunked work: bounds scratch memory


def chunked_sum(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """stable_sum of fn(*chunks) over the flattened tensors, chunk by chunk, so that
    e.g. sum(|x|) or sum(a * b) never builds a full-size temporary."""
    flats = [t.reshape(-1) for t in tensors]
    total = torch.zeros((), dtype=torch.float64, device=flats[0].device)
    for start in range(0, flats[0].numel(), CHUNK):
        total += stable_sum(fn(*(f[start : start + CHUNK] for f in flats)))
    return total


def task_vectors(x: TensorInputs, weighted: bool = False) -> list[torch.Tensor]:
    """W_i - B of every non-base input (in place when the inputs are the kernel's to overwrite), each times its
    per-model `weight` when `weighted`."""
    base = x.tensors[x.base]
    out = []
    for i in x.non_base:
        tv = x.tensors[i].sub_(base) if x.owned else x.tensors[i] - base
        if weighted:
            tv.mul_(float(x.model_params[i]["weight"]))
        out.append(tv)
    return out


def sum_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new tensor: the inputs added in order."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


def weights_of(inputs: TensorInputs, indices: Sequence[int], key: str = "weight") -> torch.Tensor:
    ref = inputs.tensors[indices[0]]
    return torch.tensor(
        [inputs.model_params[i][key] for i in indices], dtype=ref.dtype, device=ref.device
    )
