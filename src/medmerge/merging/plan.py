"""Turn a configuration and its input models into a checked per-tensor plan.

Everything that can be wrong is found here, from headers and config files alone,
before one tensor is read: the method and its parameters for every tensor and
model, tensor names, shapes, layer counts, vocabulary sizes and dtypes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from . import architecture as arch
from . import methods
from .config import MergeConfig, evaluate_setting
from ..errors import ConfigError, InputError
from ..io.checkpoint import DTYPE_NAMES, Checkpoint, TensorRecord, resolve_model_path
from ..io.fingerprint import fingerprint
from ..io.stats import StatsFolder, expected_shape
from ..runtime import note
from .methods.base import GLOBAL, PER_NON_BASE, check_counts
from .templates import check_chat_template
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
    mergeable: bool = True  # False: non-float tensor, copied when every input holds it bit for bit
    vocab: bool = False  # rows are aligned through the plan's VocabAlignment
    # `slices:` plans: the plan's models this tensor reads (sources align with them) and the base among them;
    # None: every model, with the plan's base
    inputs: Optional[list[int]] = None
    base: Optional[int] = None
    stats: bool = False  # every input has calibration statistics for it (methods with `MethodSpec.stats`)

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
    # `slices:` plans: each output layer's (model index, source layer), so the output config can be rewritten
    layer_sources: Optional[list[tuple[int, int]]] = None
    # methods with `MethodSpec.stats`: each input's statistics folder, in the order of `models`
    stats: Optional[list[StatsFolder]] = None
    # methods with `MethodSpec.prepare`: their whole-model statistics, computed once (`compute.plan_globals`)
    globals: Optional[dict] = None

    def elementwise(self, tp: TensorPlan) -> bool:
        return tp.mergeable and not tp.vocab and self.method.spec.elementwise(tp.global_params, tp.model_params)

    def inputs_of(self, tp: TensorPlan) -> list[int]:
        """Indices into `models` of the inputs of `tp`, in the order of its sources."""
        return list(range(len(self.models))) if tp.inputs is None else tp.inputs

    def base_of(self, tp: TensorPlan) -> Optional[int]:
        """The position of the method's base among `tp`'s inputs (None: no base)."""
        return self.base if tp.inputs is None else tp.base


def dtype_text(dtype: torch.dtype) -> str:
    """torch.int8 -> 'int8'."""
    return str(dtype).replace("torch.", "")


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else getattr(torch, name)


def _coerce(param, where, relaxed: bool = False):
    def coerce(value):
        try:
            return param.coerce(value, where, relaxed=relaxed)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    return coerce


def model_entries(config: MergeConfig) -> list[tuple[str, Optional[dict]]]:
    """(reference, its parameters) of each input of a `models:` config, the appended base last."""
    refs, _ = input_refs(config)
    return [(m.model, m.parameters) for m in config.models] + [(r, None) for r in refs[len(config.models):]]


def resolve_params(method, config: MergeConfig, name: str, t: float, inputs: list[int], base: Optional[int], *,
                   label: str | None = None, lenient: bool = False,
                   entries: Optional[list[tuple[str, Optional[dict]]]] = None, scopes: Optional[list[dict]] = None):
    """(global params, per-input params) for one tensor, highest precedence first; each value checked
    against its parameter's domain, and the method's constraints between parameters checked.

    `label` names the tensor in messages; `lenient`: None instead of an error when a required
    parameter has no value (the config-only check, where filtered values match no tensor name).
    `entries` are the inputs' (reference, parameters) (default: the config's models, then its base);
    `scopes` the shared parameter dicts, highest precedence first (default: the top-level `parameters`;
    a slice's: its own `parameters`, then the top level's).
    """
    spec = method.spec
    scopes = [config.parameters or {}] if scopes is None else [sc or {} for sc in scopes]
    entries = model_entries(config) if entries is None else entries
    label = label or f"tensor {name}"
    global_params = {}
    # parameters whose domain another one lifts (`unless`) come after it
    for p in sorted((p for p in spec.params if p.scope == GLOBAL), key=lambda p: p.unless is not None):
        relaxed = bool(p.unless and global_params.get(p.unless))
        value = None
        for scope in scopes:
            if p.name in scope:
                value = evaluate_setting(name, scope[p.name], t, _coerce(p, label, relaxed))
                if value is not None:
                    break
        if value is None:
            if p.required:
                if lenient:
                    return None
                raise ConfigError(f"method {spec.name!r} needs parameter `{p.name}` ({label}); add it under `parameters:`")
            value = p.default
        global_params[p.name] = value
    global_params = {p.name: global_params[p.name] for p in spec.params if p.scope == GLOBAL}  # declared order
    per_model = []
    for i in inputs:
        ref, entry = entries[i]
        resolved = {}
        for p in spec.params:
            if p.scope == GLOBAL or (p.scope == PER_NON_BASE and i == base):
                continue
            value = None
            where = f"model {ref}, {label}"
            relaxed = bool(p.unless and global_params.get(p.unless))
            for scope in (entry or {}, *scopes):
                if p.name in scope:
                    value = evaluate_setting(name, scope[p.name], t, _coerce(p, where, relaxed))
                    if value is not None:
                        break
            if value is None:
                if p.required:
                    if lenient:
                        return None
                    raise ConfigError(
                        f"method {spec.name!r} needs `{p.name}` for model {ref} ({label}); "
                        f"set it in that model's `parameters:` or globally"
                    )
                value = p.default
            resolved[p.name] = value
        per_model.append(resolved)
    refs = [entries[i][0] for i in inputs]
    problem = spec.check(global_params, list(zip(refs, per_model)))
    if problem:
        raise ConfigError(f"{problem} ({label})")
    return global_params, per_model


def _model_scopes(config: MergeConfig):
    """(config key, model, parameters) of every per-model parameter dict: each model's, or each slice source's."""
    for i, m in enumerate(config.models):
        yield f"models[{i}] ({m.model}).parameters", m.model, m.parameters or {}
    for k, sl in enumerate(config.slices or []):
        for j, src in enumerate(sl.sources):
            yield f"slices[{k}].sources[{j}] ({src.model}).parameters", src.model, src.parameters or {}


def _check_parameter_names(method, config: MergeConfig) -> None:
    known = {p.name for p in method.spec.params}
    scopes = [("parameters", config.parameters or {})] + [
        (f"slices[{k}].parameters", sl.parameters or {}) for k, sl in enumerate(config.slices or [])
    ] + [(where, scope) for where, _, scope in _model_scopes(config)]
    for where, scope in scopes:
        for key in scope:
            if key not in known:
                raise ConfigError(
                    f"`{where}`: unknown parameter `{key}` for method {method.spec.name!r}; "
                    f"it takes: {', '.join(sorted(known))}"
                )
    for where, _, scope in _model_scopes(config):
        for key in scope:
            if method.spec.param(key).scope == GLOBAL:
                raise ConfigError(
                    f"`{where}`: `{key}` is a global parameter of "
                    f"{method.spec.name!r}; set it under the top-level `parameters:`"
                    + (" (or the slice's)" if where.startswith("slices") else "")
                )


def _settings(config: MergeConfig):
    """(config key, whose, parameter, setting) of every parameter setting: the top level's, each slice's, then
    each model's (or slice source's)."""
    for key, setting in (config.parameters or {}).items():
        yield "parameters", "`parameters`", key, setting
    for k, sl in enumerate(config.slices or []):
        for key, setting in (sl.parameters or {}).items():
            yield f"slices[{k}].parameters", f"slice {k}", key, setting
    for where, model, scope in _model_scopes(config):
        for key, setting in scope.items():
            yield where, f"model {model}", key, setting


def _setting_values(setting):
    """Every scalar a setting can resolve to (gradient points, each condition's value), and every filter."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        for item in setting:
            if isinstance(item, dict):
                if "value" not in item:
                    raise ConfigError(f"parameter condition {item!r} needs `value` (and optionally `filter`)")
                if item.get("filter") is not None:
                    yield "filter", item["filter"]
                yield from _setting_values(item["value"])
            else:
                yield "value", item
    elif setting is not None:
        yield "value", setting


def _check_parameter_values(method, config: MergeConfig) -> None:
    """Every value the config gives a parameter (each gradient point, each filtered value) lies in its domain.

    The per-tensor resolution checks the values each tensor gets (and the constraints between
    parameters); this pass also covers values that no tensor ends up using, and names the key.
    """
    spec = method.spec
    # a parameter that lifts another's domain (allow_extrapolation) counts when it is true anywhere
    lifted = {key for _, _, key, setting in _settings(config)
              if setting is True or (isinstance(setting, str) and setting.lower() == "true")}
    for _, whose, key, setting in _settings(config):
        p = spec.param(key)
        coerce = _coerce(p, whose, relaxed=bool(p.unless and p.unless in lifted))
        for kind, value in _setting_values(setting):
            if kind == "value":
                coerce(value)


def check_config(config: MergeConfig) -> methods.MergeMethod:
    """Every check that needs no model: the method exists, its parameters are known and in their domains.

    `build_plan` runs it first; a sweep runs it on every point of its grid before evaluating anything.
    """
    method = _method(config)
    check_chat_template(config.chat_template)
    _check_parameter_names(method, config)
    _check_parameter_values(method, config)
    refs, base = input_refs(config)
    if config.slices is not None:
        for k, sl in enumerate(config.slices):
            entries, slice_base, scopes = slice_inputs(config, k, method)
            problem = check_counts(method.spec, len(entries), slice_base is not None)
            if problem:
                raise ConfigError(f"slices[{k}]: {problem}")
            for t, where in ((0.0, "its first layer"), (1.0, "its last layer")):
                resolve_params(method, config, "", t, list(range(len(entries))), slice_base, lenient=True,
                               label=f"slices[{k}], the values of {where}", entries=entries, scopes=scopes)
        return method
    has_base = base is not None and method.spec.base != "ignored"
    if check_counts(method.spec, len(refs), has_base) is None:
        # the constraints between parameters, for the values of tensors no filter matches, at both
        # ends of any gradient (every tensor is checked again when the plan is built)
        for t, where in ((0.0, "the first layer"), (1.0, "the last layer")):
            resolve_params(method, config, "", t, list(range(len(refs))), base if has_base else None,
                           label=f"the values of {where}", lenient=True)
    return method


def _check_filters(config: MergeConfig, names: list[str]) -> None:
    """A condition's `filter` must match (be a substring of) at least one output tensor name."""
    for where, _, key, setting in _settings(config):
        for kind, flt in _setting_values(setting):
            if kind == "filter" and flt != "*" and not any(str(flt) in n for n in names):
                raise ConfigError(
                    f"`{where}.{key}`: filter {flt!r} matches no tensor of the models (a filter is a substring of "
                    f"tensor names such as {names[0] if names else '-'!r}); fix the filter or drop that condition"
                )


def ref_key(ref: str) -> str:
    """What two spellings of one model reference share: `~` expanded, `a/.`, `a/` and `x/../a` normalised.

    (Symbolic links are followed once the folders are opened: `build_plan` compares their resolved paths.)
    """
    return os.path.normpath(os.path.expanduser(str(ref))) if str(ref) else str(ref)


def ref_index(refs: list[str], ref: str) -> Optional[int]:
    """The position of `ref` among `refs`, however it is spelled (`ref_key`), or None."""
    key = ref_key(ref)
    return next((i for i, r in enumerate(refs) if ref_key(r) == key), None)


def input_refs(config: MergeConfig) -> tuple[list[str], Optional[int]]:
    """Input model references in order, and the base's position (mergekit appends a missing base).

    The base is one of the listed models when it names the same folder, however it is spelled
    (`base/` and `base`).
    """
    if config.slices is not None:  # every model the slices read, in order of first appearance
        refs: list[str] = []
        for sl in config.slices:
            for src in sl.sources:
                if ref_index(refs, src.model) is None:
                    refs.append(src.model)
        # a base_model no slice reads is not opened (slice_inputs refuses it where the method needs a base)
        return refs, ref_index(refs, config.base_model) if config.base_model is not None else None
    refs = [m.model for m in config.models]
    base = None
    if config.base_model is not None:
        base = ref_index(refs, config.base_model)
        if base is None:
            refs.append(config.base_model)
            base = len(refs) - 1
    return refs, base


def slice_inputs(config: MergeConfig, k: int, method) -> tuple[list[tuple[str, Optional[dict]]], Optional[int],
                                                                  list[dict]]:
    """Slice k's inputs as (reference, parameters), the method's base among them (None: no base), and its
    shared parameter scopes (the slice's, then the top level's). The slice's `base_model` overrides the
    config's; when the method uses a base, it must be one of the slice's sources."""
    sl = config.slices[k]
    entries = [(src.model, src.parameters) for src in sl.sources]
    base_ref = sl.base_model or config.base_model
    base = None
    if base_ref is not None and method.spec.base != "ignored":
        base = ref_index([e[0] for e in entries], base_ref)
        if base is None:
            raise ConfigError(f"slices[{k}]: the base model {base_ref!r} is not one of this slice's sources; add "
                              "its layer range to the slice's `sources` (method "
                              f"{method.spec.name!r} merges relative to the base)")
    return entries, base, [sl.parameters or {}, config.parameters or {}]


def _check_distinct(refs: list[str], models: list[ModelSource], listed: int) -> None:
    """Each input once: no two references that spell, or resolve to (symlinks), the same folder."""
    keys = [ref_key(r) for r in refs]
    paths = [getattr(m, "path", None) for m in models]
    for j in range(len(refs)):
        for i in range(j):
            if keys[i] == keys[j]:
                raise ConfigError(f"the same model is listed twice in `models` ({refs[i]!r} and {refs[j]!r}); "
                                  "list each input once")
            if paths[i] is not None and paths[j] is not None and Path(paths[i]).resolve() == Path(paths[j]).resolve():
                which = "`base_model`" if j >= listed else "`models`"
                raise ConfigError(
                    f"{refs[i]!r} and {refs[j]!r} (in {which}) are the same folder ({Path(paths[i]).resolve()}); "
                    "list each input once, and give `base_model` exactly as it is spelled in `models` when it is "
                    "one of them")


def open_models(refs: list[str], allow_pickle: bool = False, relative_to: Optional[Path] = None) -> list[Checkpoint]:
    return [Checkpoint(resolve_model_path(r, relative_to), allow_pickle=allow_pickle) for r in refs]


def build_plan(
    config: MergeConfig,
    models: list[ModelSource],
    *,
    trust_remote_code: bool = False,
    relative_to: Optional[Path] = None,
) -> MergePlan:
    """Check `config` against its input models (headers and configs only) and plan every output tensor.

    `relative_to`: the folder relative paths in the config (statistics folders) are resolved against.
    """
    method = check_config(config)
    refs, base = input_refs(config)
    if len(models) != len(refs):
        raise ConfigError(f"expected {len(refs)} input models, got {len(models)}")
    if (method.spec.stats or method.spec.prepare) and config.slices is not None:
        raise ConfigError(f"method {method.spec.name!r} merges whole models with whole-model statistics: list them "
                          "under `models:`, not `slices:`")
    if config.slices is not None:
        return _build_slice_plan(config, method, models, refs, base)
    has_base = base is not None and method.spec.base != "ignored"
    problem = check_counts(method.spec, len(refs), has_base)
    if problem:
        raise ConfigError(problem)
    _check_distinct(refs, models, len(config.models))
    method_base = base if has_base else None
    reference = base if base is not None else 0
    check_architectures(models, refs, reference)
    n_layers = _layer_count(models, refs, reference)
    names, sources, ignored = _tensor_sources(models, refs, reference)
    _check_filters(config, names)
    alignment = _vocab_alignment(config, models, refs, base, names, sources, trust_remote_code)

    load_dtype = torch_dtype(config.dtype)
    entries = model_entries(config)  # once, not per tensor
    tensors = [
        _tensor_plan(name, method, config, models, refs, reference, method_base, sources, alignment, n_layers,
                     torch_dtype(config.out_dtype) or load_dtype, entries=entries)
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
        work_dtype=work_dtype(config, models),
        load_dtype=load_dtype,
        vocab=alignment,
        ignored_tensors=ignored,
        stats=_open_stats(method, models, refs, tensors, relative_to) if method.spec.stats else None,
    )


def _open_stats(method, models: list[ModelSource], refs: list[str], tensors: list[TensorPlan],
                relative_to: Optional[Path]) -> list[StatsFolder]:
    """Each input's statistics folder, checked: one folder per model, computed on that model, holding the
    method's statistics of a tensor for every input or for none (then the tensor is averaged), shapes right.
    Marks the tensors that have them (`TensorPlan.stats`)."""
    kind, name = method.spec.stats, method.spec.name
    folders = []
    for i, (model, ref) in enumerate(zip(models, refs)):
        given = {tp.model_params[i]["stats"] for tp in tensors if tp.mergeable}
        if len(given) != 1:
            raise ConfigError(f"method {name!r}: model {ref} needs one statistics folder (`stats`) for all its "
                              f"tensors, got {len(given)}: {', '.join(sorted(given))}")
        path = Path(given.pop()).expanduser()
        if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
            path = relative_to / path
        folder = StatsFolder(path)
        if kind not in folder.kinds:
            raise InputError(f"{path} holds {', '.join(folder.kinds) or 'no'} statistics, and method {name!r} needs "
                             f"{kind}: recompute them with `medmerge stats {ref} --data FILE --kinds {kind} --out "
                             f"{path}`")
        model_path = getattr(model, "path", None)
        if model_path is not None:
            recorded, actual = folder.record.get("model_fingerprint"), fingerprint(model_path)
            if recorded != actual:
                raise InputError(
                    f"the statistics in {path} were computed on {folder.record.get('model')} (fingerprint "
                    f"{str(recorded)[:12]}), not on input {ref} (fingerprint {actual[:12]}): statistics of another "
                    f"model would weigh this one wrongly; compute them with `medmerge stats {ref} --data FILE "
                    f"--out STATS`")
        folders.append(folder)
    for tp in tensors:
        if not tp.mergeable:
            continue
        have = [folder.has(kind, src) for folder, src in zip(folders, tp.sources)]
        if not any(have):
            continue
        if not all(have):
            lacking = refs[have.index(False)]
            raise InputError(f"tensor {tp.name!r} has {kind} statistics in some inputs but not in those of {lacking} "
                             f"({folders[have.index(False)].path}): compute every model's statistics with the same "
                             "`medmerge stats` settings")
        if tp.vocab and kind != "gram":
            raise ConfigError(f"method {name!r} cannot merge tensor {tp.name!r} across different vocabularies (its "
                              "statistics' rows would need the same alignment); merge models that share a tokenizer")
        for folder, src, ref, model in zip(folders, tp.sources, refs, models):
            want = expected_shape(kind, model.records[src].shape)
            got = folder.shape(kind, src)
            if got != want:
                raise InputError(f"{folder.path}: the {kind} statistics of tensor {src!r} have shape {list(got)}, "
                                 f"and input {ref}'s tensor needs {list(want)}: these statistics belong to another "
                                 "architecture; recompute them for this model")
        tp.stats = True
        if kind == "fisher":  # the whole-model norm that normalize needs, from each record
            for mp, folder in zip(tp.model_params, folders):
                mp["fisher_norm"] = folder.record.get("fisher_norm") or 0.0
    return folders


def _method(config: MergeConfig) -> methods.MergeMethod:
    try:
        return methods.get(config.merge_method)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def check_architectures(models: list[ModelSource], refs: list[str], reference: int) -> None:
    """Every input folder has a config.json without custom code, of the reference's model_type and architectures.

    In-memory state dicts (no folder) carry no config and are not checked.
    """
    for m, ref in zip(models, refs):
        if getattr(m, "path", None) is None:
            continue
        if not m.config:
            raise InputError(
                f"model folder {ref} has no config.json (or an empty one): medmerge needs each input's config.json "
                "to check that the inputs share one architecture and to write a loadable output. Copy the "
                "config.json of the model it was fine-tuned from into that folder, or re-save the model with "
                "transformers' save_pretrained"
            )
        auto_map = m.config.get("auto_map")
        # custom model code; a custom tokenizer alone is the tokenizer's business (--trust-remote-code)
        code = sorted(k for k in auto_map if k != "AutoTokenizer") if isinstance(auto_map, dict) else \
            ([str(auto_map)] if auto_map else [])
        if code:
            raise InputError(
                f"model {ref}: config.json has `auto_map` ({', '.join(code)}): "
                "its architecture is custom Python code shipped with the model, and medmerge never runs remote code "
                "(--trust-remote-code only lets tokenizers run theirs), so it cannot check or write such a model. "
                "Convert it to a standard transformers architecture first: if its weights follow a built-in one, "
                "remove `auto_map` and set `model_type` and `architectures` to it (e.g. llama, LlamaForCausalLM); "
                "otherwise load it with trust_remote_code=True where you trust the code, port the weights to the "
                "built-in class and save that with save_pretrained"
            )
    ref_model = models[reference]
    if getattr(ref_model, "path", None) is None:
        return
    for m, ref in zip(models, refs):
        if m is ref_model or getattr(m, "path", None) is None:
            continue
        for key in ("model_type", "architectures"):
            want, got = ref_model.config.get(key), m.config.get(key)
            if key == "architectures" and (want is None or got is None):
                continue  # configs saved without the list: model_type still decides
            if want != got:
                raise InputError(
                    f"input models are of different architectures: {ref} has {key} {got!r} but {refs[reference]} "
                    f"has {want!r} (config.json); merge models of one architecture (fine-tunes of one base)"
                )


def _layer_count(models: list[ModelSource], refs: list[str], reference: int) -> int:
    """The layer count all inputs share, from config.json (else the tensor names)."""
    layer_counts = []
    for m, ref in zip(models, refs):
        try:
            layer_counts.append(arch.num_layers(m.config, m.records))
        except arch.LayerCountError as e:
            path = getattr(m, "path", None)
            where = f"{Path(path) / 'config.json'}" if path is not None else f"the config of {ref}"
            raise InputError(f"{where}: {e}; fix config.json to the number of layers the model's weights hold "
                             "(or use the config.json saved with these weights)") from None
    if len(set(layer_counts)) > 1:
        detail = ", ".join(f"{r}: {n}" for r, n in zip(refs, layer_counts))
        raise InputError(f"input models have different numbers of layers ({detail}); merge models of one architecture")
    return layer_counts[reference]


def source_name(model: ModelSource, name: str) -> Optional[str]:
    """The tensor `model` holds for output tensor `name`: itself, or the embedding a tied head reads; None."""
    if name in model.records:
        return name
    return next((a for a in arch.TIED_ALIASES.get(name, ()) if a in model.records), None)


def work_dtype(config: MergeConfig, models: list[ModelSource]) -> torch.dtype:
    """float64 when the config loads in float64 or any input holds float64 tensors; float32 otherwise."""
    wide = torch_dtype(config.dtype) == torch.float64 or any(r.dtype == "F64" for m in models
                                                              for r in m.records.values())
    return torch.float64 if wide else torch.float32


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
            alias = source_name(m, name)
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
    block = config.tokenizer
    if config.tokenizer_source is None and block is None:
        if len(set(rows)) > 1:
            detail = ", ".join(f"{r}: {n}" for r, n in zip(refs, rows))
            raise InputError(
                f"vocabulary sizes differ ({detail}) for {vocab_names[0]}. Choose how to align them: "
                "`tokenizer_source: base` (keep the base tokenizer; rows matched by token string), "
                "`tokenizer_source: union` (all tokens of all models), or `tokenizer_source: <model>`"
            )
        return None
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    source = block.source if block is not None else config.tokenizer_source
    if source not in ("base", "union"):
        index = ref_index(refs, source)
        if index is None:
            raise ConfigError(f"{key} {source!r} is neither `base`, `union` nor one of the input models")
        source = str(index)
    paths = [getattr(m, "path", None) for m in models]
    if any(p is None for p in paths):
        raise ConfigError(f"{key} needs model folders with tokenizers, not in-memory state dicts")
    return build_alignment(source, paths, rows, base, trust_remote_code,
                           tokens=block.tokens if block is not None else None,
                           pad_to_multiple_of=block.pad_to_multiple_of if block is not None else None,
                           model_index=lambda ref: ref_index(refs, ref))


def _tensor_plan(name: str, method, config: MergeConfig, models: list[ModelSource], refs: list[str], reference: int,
                 method_base: Optional[int], sources: list[dict[str, str]], alignment: Optional[VocabAlignment],
                 n_layers: int, out_dtype_cfg: Optional[torch.dtype], *, t: Optional[float] = None,
                 entries=None, scopes=None, label: Optional[str] = None) -> TensorPlan:
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
    if not floating:
        # integer, boolean or quantized: never merged, copied only when every input holds the same tensor
        # (the data is compared when it is read, `compute.merge_loaded`); here the dtypes must agree
        first = recs[reference]
        for rec, ref in zip(recs, refs):
            if rec.dtype != first.dtype:
                odd, odd_ref, other, other_ref = (first, refs[reference], rec, ref) \
                    if not first.torch_dtype.is_floating_point else (rec, ref, first, refs[reference])
                raise InputError(
                    f"tensor {name!r} is {dtype_text(odd.torch_dtype)} in {odd_ref} ({odd.file}) but "
                    f"{dtype_text(other.torch_dtype)} in {other_ref} ({other.file}): medmerge merges floating-point "
                    "tensors only (an integer, boolean or quantized tensor is copied when every input holds the "
                    "identical one); dequantize the models first (e.g. load and re-save them in bfloat16)"
                )
    t = arch.layer_t(name, n_layers) if t is None else t
    global_params, model_params = resolve_params(method, config, name, t, list(range(len(refs))), method_base,
                                                 entries=entries, scopes=scopes, label=label)
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


# --- `slices:` ------------------------------------------------------------------------------------------------

def _layer_template(name: str) -> Optional[tuple[str, int]]:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 3); None outside layers."""
    m = arch.LAYER_RE.search(name)
    if m is None:
        return None
    return name[: m.start(1)] + "{}" + name[m.end(1):], int(m.group(1))


def _layers_of(model: ModelSource) -> dict[int, dict[str, str]]:
    """Each layer's tensors of a model: {layer: {template: name}}."""
    out: dict[int, dict[str, str]] = {}
    for name in model.records:
        tl = _layer_template(name)
        if tl is not None:
            out.setdefault(tl[1], {})[tl[0]] = name
    return out


PRE_LAYER_PARTS = ("embed", "wte.", "wpe.")  # token and position embeddings (llama, gpt2, ...)


def _is_pre(name: str) -> bool:
    """Tensors before the layers (token and position embeddings); the rest (final norm, head) come after."""
    return any(part in name for part in PRE_LAYER_PARTS) and not name.endswith(arch.OUTPUT_HEADS)


def _build_slice_plan(config: MergeConfig, method, models: list[ModelSource], refs: list[str],
                      base: Optional[int]) -> MergePlan:
    """mergekit's `slices:` form: output layers are the slices' layers in order. Slice k's layer i merges layer
    start_j + i of each of its sources j, with t = i / (n_k - 1) for gradients (1 for a one-layer slice);
    tensors before the layers (embeddings) merge the first slice's sources, those after (final norm, head)
    the last slice's, at t = 0; parameters: the source's, then the slice's, then the top level's."""
    _check_distinct(refs, models, len(refs))
    reference = base if base is not None else ref_index(refs, config.slices[0].sources[0].model)
    check_architectures(models, refs, reference)
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise ConfigError("tokenizer_source or a `tokenizer:` block with `slices:` is not supported yet: merge "
                          "models that share one vocabulary, or use the `models:` form")
    counts = [arch.num_layers(m.config, m.records) for m in models]
    layers = [_layers_of(m) for m in models]
    for k, sl in enumerate(config.slices):
        if sl.residual_weight is not None:
            note(f"slices[{k}].residual_weight is accepted for mergekit compatibility and has no effect (mergekit "
                 "0.1.5 declares it and never uses it)")
        for j, src in enumerate(sl.sources):
            i = ref_index(refs, src.model)
            start, end = src.layer_range
            if end > counts[i]:
                raise ConfigError(f"slices[{k}].sources[{j}]: layer_range {list(src.layer_range)} reaches past the "
                                  f"{counts[i]} layers of {src.model} (layers 0 to {counts[i] - 1}; end is excluded)")
    out_dtype_cfg = torch_dtype(config.out_dtype) or torch_dtype(config.dtype)
    ref_model = models[reference]
    ordered = sorted(ref_model.records, key=lambda n: (str(ref_model.records[n].file), ref_model.records[n].start))
    outside = [n for n in ordered if _layer_template(n) is None]
    tensors: list[TensorPlan] = []
    layer_sources: list[tuple[int, int]] = []
    per_slice = [slice_inputs(config, k, method) for k in range(len(config.slices))]  # checked once per slice
    slice_models = [[ref_index(refs, ref) for ref, _ in entries] for entries, _, _ in per_slice]

    def add(out_name: str, k: int, names: list[str], t: float) -> None:
        (entries, slice_base, scopes), inputs = per_slice[k], slice_models[k]
        tp = _tensor_plan(out_name, method, config, [models[i] for i in inputs], [refs[i] for i in inputs],
                          slice_base or 0, slice_base, [{out_name: n} for n in names], None, 0, out_dtype_cfg, t=t,
                          entries=entries, scopes=scopes, label=f"tensor {out_name} (slices[{k}])")
        tp.inputs, tp.base = inputs, slice_base
        tensors.append(tp)

    def outside_names(k: int, name: str) -> list[str]:
        names = [source_name(models[i], name) for i in slice_models[k]]
        for src, found in zip(config.slices[k].sources, names):
            if found is None:
                raise InputError(f"model {src.model} has no tensor {name!r} (present in {refs[reference]}), which "
                                 f"slices[{k}] merges; the inputs must share one architecture")
        return names

    for name in (n for n in outside if _is_pre(n)):
        add(name, 0, outside_names(0, name), 0.0)
    for k, sl in enumerate(config.slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        first_model = models[slice_models[k][0]]
        for i in range(n):
            per_source = []
            for src, mi in zip(sl.sources, slice_models[k]):
                held = layers[mi].get(src.layer_range[0] + i)
                if held is None:
                    raise InputError(f"model {src.model} holds no tensors of layer {src.layer_range[0] + i}, which "
                                     f"slices[{k}] reads")
                per_source.append(held)
            first = per_source[0]
            for src, held in zip(sl.sources[1:], per_source[1:]):
                if set(held) != set(first):
                    odd = sorted(set(held) ^ set(first))[0].format(src.layer_range[0] + i)
                    raise InputError(f"slices[{k}]: layer {src.layer_range[0] + i} of {src.model} and layer "
                                     f"{sl.sources[0].layer_range[0] + i} of {sl.sources[0].model} hold different "
                                     f"tensors (e.g. {odd!r}); the sources must share one architecture")
            t = i / (n - 1) if n > 1 else 1.0
            out_layer = len(layer_sources)
            for template in sorted(first, key=lambda tmpl: (str(first_model.records[first[tmpl]].file),
                                                             first_model.records[first[tmpl]].start)):
                add(template.format(out_layer), k, [held[template] for held in per_source], t)
            layer_sources.append((slice_models[k][0], sl.sources[0].layer_range[0] + i))
    for name in (n for n in outside if not _is_pre(n)):
        add(name, len(config.slices) - 1, outside_names(len(config.slices) - 1, name), 0.0)
    _check_filters(config, [tp.name for tp in tensors])
    used = {n for tp in tensors for n in tp.sources}
    return MergePlan(
        config=config, method=method, models=models, model_refs=refs,
        base=base if base is not None and method.spec.base != "ignored" else None, reference=reference,
        tensors=tensors, seed=config.random_seed if config.random_seed is not None else 0,
        work_dtype=work_dtype(config, models), load_dtype=torch_dtype(config.dtype), vocab=None,
        # tensors outside the layers that no slice reads (layers left out of every slice are meant to be)
        ignored_tensors=sorted(n for n in {n for m in models for n in m.records} - used if _layer_template(n) is None),
        layer_sources=layer_sources,
    )
