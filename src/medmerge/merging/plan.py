"""Turn a configuration and its input models into a checked per-tensor plan.

Everything that can be wrong is found here, from headers and config files alone,
before one tensor is read: the method and its parameters for every tensor and
model, tensor names, shapes, layer counts, vocabulary sizes and dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from . import architecture as arch
from . import methods
from .config import MergeConfig, evaluate_setting
from ..errors import ConfigError, InputError
from ..io.checkpoint import DTYPE_NAMES, Checkpoint, TensorRecord, resolve_model_path
from .methods.base import GLOBAL, PER_NON_BASE, check_counts
from .vocab import VocabAlignment, build_alignment


class ModelSource(Protocol):
    label: str
    config: dict
    records: dict[str, TensorRecord]

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor: ...


class StateDictSource:
    """An in-memory state dict presented like a checkpoint (no copies on read)."""

    fresh_reads = False

    def __init__(self, state_dict: dict[str, torch.Tensor], label: str, config: Optional[dict] = None):
        self.label = label
        self.config = config or {}
        self.path = None
        self.tensors = {k: v.detach() for k, v in state_dict.items()}
        self.records = {
            k: TensorRecord(k, Path(label), DTYPE_NAMES[v.dtype], tuple(v.shape), 0, v.numel() * v.element_size())
            for k, v in self.tensors.items()
        }

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if rows is None else t[rows[0] : rows[1]]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: list[str]  # tensor name to read in each input model
    global_params: dict
    model_params: list[dict]
    mergeable: bool = True  # False: non-float tensor copied from the reference model
    vocab: bool = False  # rows are aligned through the plan's VocabAlignment

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    config: MergeConfig  # as given
    method: methods.MergeMethod
    models: list[ModelSource]  # inputs in mergekit order (models, then base if not listed)
    model_refs: list[str]
    base: Optional[int]
    reference: int  # model whose layout, config and tokenizer the output follows
    tensors: list[TensorPlan]
    seed: int
    work_dtype: torch.dtype
    load_dtype: Optional[torch.dtype]
    vocab: Optional[VocabAlignment] = None
    ignored_tensors: list[str] = field(default_factory=list)

    def elementwise(self, tp: TensorPlan) -> bool:
        return tp.mergeable and not tp.vocab and self.method.spec.elementwise(tp.global_params, tp.model_params)


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else getattr(torch, name)


def _coerce(param, where):
    def coerce(value):
        try:
            return param.coerce(value, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    return coerce


def resolve_params(method, config: MergeConfig, name: str, t: float, inputs: list[int], base: Optional[int]):
    """(global params, per-input params) for one tensor, highest precedence first."""
    spec = method.spec
    top = config.parameters or {}
    global_params = {}
    for p in spec.params:
        if p.scope != GLOBAL:
            continue
        value = evaluate_setting(name, top[p.name], t, _coerce(p, name)) if p.name in top else None
        if value is None:
            if p.required:
                raise ConfigError(f"method {spec.name!r} needs parameter `{p.name}` (tensor {name}); add it under `parameters:`")
            value = p.default
        global_params[p.name] = value
    per_model = []
    for i in inputs:
        entry = config.models[i].parameters if i < len(config.models) else None
        ref = config.models[i].model if i < len(config.models) else config.base_model
        resolved = {}
        for p in spec.params:
            if p.scope == GLOBAL or (p.scope == PER_NON_BASE and i == base):
                continue
            value = None
            where = f"model {ref}, tensor {name}"
            for scope in (entry or {}, top):
                if p.name in scope:
                    value = evaluate_setting(name, scope[p.name], t, _coerce(p, where))
                    if value is not None:
                        break
            if value is None:
                if p.required:
                    raise ConfigError(
                        f"method {spec.name!r} needs `{p.name}` for model {ref} (tensor {name}); "
                        f"set it in that model's `parameters:` or globally"
                    )
                value = p.default
            resolved[p.name] = value
        per_model.append(resolved)
    return global_params, per_model


def _check_parameter_names(method, config: MergeConfig) -> None:
    known = {p.name for p in method.spec.params}
    scopes = [("parameters", config.parameters or {})] + [
        (f"models[{i}] ({m.model}).parameters", m.parameters or {}) for i, m in enumerate(config.models)
    ]
    for where, scope in scopes:
        for key in scope:
            if key not in known:
                raise ConfigError(
                    f"`{where}`: unknown parameter `{key}` for method {method.spec.name!r}; "
                    f"it takes: {', '.join(sorted(known))}"
                )
    for i, m in enumerate(config.models):
        for key in m.parameters or {}:
            if method.spec.param(key).scope == GLOBAL:
                raise ConfigError(
                    f"`models[{i}] ({m.model}).parameters`: `{key}` is a global parameter of "
                    f"{method.spec.name!r}; set it under the top-level `parameters:`"
                )


def input_refs(config: MergeConfig) -> tuple[list[str], Optional[int]]:
    """Input model references in order, and the base's position (mergekit appends a missing base)."""
    refs = [m.model for m in config.models]
    base = None
    if config.base_model is not None:
        if config.base_model in refs:
            base = refs.index(config.base_model)
        else:
            refs.append(config.base_model)
            base = len(refs) - 1
    return refs, base


def open_models(refs: list[str], allow_pickle: bool = False, relative_to: Optional[Path] = None) -> list[Checkpoint]:
    return [Checkpoint(resolve_model_path(r, relative_to), allow_pickle=allow_pickle) for r in refs]


def build_plan(
    config: MergeConfig,
    models: list[ModelSource],
    *,
    trust_remote_code: bool = False,
) -> MergePlan:
    """Check `config` against its input models (headers and configs only) and plan every output tensor."""
    method = _method(config)
    refs, base = input_refs(config)
    if len(models) != len(refs):
        raise ConfigError(f"expected {len(refs)} input models, got {len(models)}")
    has_base = base is not None and method.spec.base != "ignored"
    problem = check_counts(method.spec, len(refs), has_base)
    if problem:
        raise ConfigError(problem)
    if len(set(refs)) != len(refs):
        raise ConfigError("the same model is listed twice in `models`; list each input once")
    _check_parameter_names(method, config)
    method_base = base if has_base else None
    reference = base if base is not None else 0
    n_layers = _layer_count(models, refs, reference)
    names, sources, ignored = _tensor_sources(models, refs, reference)
    alignment = _vocab_alignment(config, models, refs, base, names, sources, trust_remote_code)

    load_dtype = torch_dtype(config.dtype)
    wide = load_dtype == torch.float64 or any(r.dtype == "F64" for m in models for r in m.records.values())
    tensors = [
        _tensor_plan(name, method, config, models, refs, reference, method_base, sources, alignment, n_layers,
                     torch_dtype(config.out_dtype) or load_dtype)
        for name in names
    ]
    return MergePlan(
        config=config,
        method=method,
        models=models,
        model_refs=refs,
        base=method_base,
        reference=reference,
        tensors=tensors,
        seed=config.random_seed if config.random_seed is not None else 0,
        work_dtype=torch.float64 if wide else torch.float32,
        load_dtype=load_dtype,
        vocab=alignment,
        ignored_tensors=ignored,
    )


def _method(config: MergeConfig) -> methods.MergeMethod:
    try:
        return methods.get(config.merge_method)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _layer_count(models: list[ModelSource], refs: list[str], reference: int) -> int:
    """The layer count all inputs share, from config.json (else the tensor names)."""
    layer_counts = [arch.num_layers(m.config, m.records) for m in models]
    if len(set(layer_counts)) > 1:
        detail = ", ".join(f"{r}: {n}" for r, n in zip(refs, layer_counts))
        raise InputError(f"input models have different numbers of layers ({detail}); merge models of one architecture")
    return layer_counts[reference]


def _tensor_sources(models: list[ModelSource], refs: list[str], reference: int
                    ) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """(output tensor names in the reference's file order, per model the tensor to read for each, ignored names).

    A model lacking a tied head (`lm_head.weight`) reads its embedding instead; tensors only
    non-reference models have are ignored (and reported).
    """
    ref_model = models[reference]
    names = sorted(ref_model.records, key=lambda n: (str(ref_model.records[n].file), ref_model.records[n].start))
    sources: list[dict[str, str]] = []
    for m, ref in zip(models, refs):
        mapping = {}
        for name in names:
            if name in m.records:
                mapping[name] = name
                continue
            alias = next((a for a in arch.TIED_ALIASES.get(name, ()) if a in m.records), None)
            if alias is None:
                raise InputError(
                    f"model {ref} has no tensor {name!r} (present in {refs[reference]}); "
                    "inputs must share one architecture"
                )
            mapping[name] = alias
        sources.append(mapping)
    used = {a for mapping in sources for a in mapping.values()}
    ignored = sorted({n for m in models for n in m.records} - set(names) - used)
    return names, sources, ignored


def _vocab_alignment(config: MergeConfig, models: list[ModelSource], refs: list[str], base: Optional[int],
                     names: list[str], sources: list[dict[str, str]], trust_remote_code: bool
                     ) -> Optional[VocabAlignment]:
    """Rows of token-indexed tensors must agree unless `tokenizer_source` says how to align them."""
    vocab_names = [n for n in names if arch.vocab_axis(n) is not None]
    if not vocab_names:
        return None
    rows = [m.records[sources[i][vocab_names[0]]].shape[0] for i, m in enumerate(models)]
    if config.tokenizer_source is None:
        if len(set(rows)) > 1:
            detail = ", ".join(f"{r}: {n}" for r, n in zip(refs, rows))
            raise InputError(
                f"vocabulary sizes differ ({detail}) for {vocab_names[0]}. Choose how to align them: "
                "`tokenizer_source: base` (keep the base tokenizer; rows matched by token string), "
                "`tokenizer_source: union` (all tokens of all models), or `tokenizer_source: <model>`"
            )
        return None
    source = config.tokenizer_source
    if source not in ("base", "union"):
        if source not in refs:
            raise ConfigError(f"tokenizer_source {source!r} is neither `base`, `union` nor one of the input models")
        source = str(refs.index(source))
    paths = [getattr(m, "path", None) for m in models]
    if any(p is None for p in paths):
        raise ConfigError("tokenizer_source needs model folders with tokenizers, not in-memory state dicts")
    return build_alignment(source, paths, rows, base, trust_remote_code)


def _tensor_plan(name: str, method, config: MergeConfig, models: list[ModelSource], refs: list[str], reference: int,
                 method_base: Optional[int], sources: list[dict[str, str]], alignment: Optional[VocabAlignment],
                 n_layers: int, out_dtype_cfg: Optional[torch.dtype]) -> TensorPlan:
    """One output tensor: shapes checked across inputs, parameters resolved at its layer, its output dtype."""
    recs = [m.records[sources[i][name]] for i, m in enumerate(models)]
    shape = recs[reference].shape
    is_vocab = alignment is not None and arch.vocab_axis(name) is not None
    for rec, ref in zip(recs, refs):
        other = rec.shape[1:] if is_vocab else rec.shape
        want = shape[1:] if is_vocab else shape
        if tuple(other) != tuple(want):
            raise InputError(
                f"tensor {name!r} has shape {list(rec.shape)} in {ref} but {list(shape)} in "
                f"{refs[reference]}; the models do not share one architecture"
            )
    if is_vocab:
        shape = (alignment.size, *shape[1:])
    floating = all(r.torch_dtype.is_floating_point for r in recs)
    t = arch.layer_t(name, n_layers)
    global_params, model_params = resolve_params(method, config, name, t, list(range(len(refs))), method_base)
    if floating:
        promoted = recs[0].torch_dtype
        for r in recs[1:]:
            promoted = torch.promote_types(promoted, r.torch_dtype)
        out_dtype = out_dtype_cfg or promoted
    else:
        out_dtype = recs[reference].torch_dtype
    return TensorPlan(
        name=name,
        shape=tuple(shape),
        out_dtype=out_dtype,
        sources=[sources[i][name] for i in range(len(models))],
        global_params=global_params,
        model_params=model_params,
        mergeable=floating,
        vocab=is_vocab,
    )
