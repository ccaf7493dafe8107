"""mergekit-compatible merge configuration (the `models:` form).

A parameter value is a scalar, a gradient (a list interpolated over the layer
index), or a list of `{filter, value}` conditions where the first whose filter
is a substring of the tensor name wins. Per-model parameters take precedence
over the top-level `parameters`. Tensors outside the repeated layers
(embeddings, final norm, lm_head) resolve gradients at t = 0, as mergekit 0.1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..settings import load_yaml

DTYPES = ("float32", "float16", "bfloat16", "float64")
UNSUPPORTED_KEYS = {
    "modules": "per-module configs (`modules`) are not supported; use the `models:` form",
}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[dict[str, Any]] = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v):
        if isinstance(v, dict):  # mergekit's {model: {path: ...}} spelling
            inner = v.get("model", v)
            v = inner.get("path") if isinstance(inner, dict) else inner
        return v


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelToken(BaseModel):
    """Another token's row of one model: by id or by token string (in that model's own vocabulary)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = Field(None, ge=0)
    token: Optional[str] = None

    _model_ref = field_validator("model", mode="before")(ModelEntry._model_ref.__func__)

    @model_validator(mode="after")
    def _one(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class TokenSource(BaseModel):
    """Where one output token's embedding rows come from: a model (its row of this token), another token of a
    model, or zeros; `force` uses it for every model, not only for those that lack the token."""

    model_config = ConfigDict(extra="forbid")
    source: Union[ZeroToken, ModelToken, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _ref(cls, v):
        if isinstance(v, dict) and "kind" not in v:  # mergekit's {model: {path: ...}} spelling of a model
            return ModelEntry._model_ref(v)
        return v


class TokenizerBlock(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary, per-token sources and padding of its size."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # union | base | a model
    tokens: Optional[dict[str, TokenSource]] = None
    pad_to_multiple_of: Optional[int] = Field(None, ge=1)

    _source_ref = field_validator("source", mode="before")(ModelEntry._model_ref.__func__)


class SliceSource(BaseModel):
    """One input of a slice: layers [start, end) of a model, with its own parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    _model_ref = field_validator("model", mode="before")(ModelEntry._model_ref.__func__)

    @field_validator("layer_range", mode="before")
    @classmethod
    def _range(cls, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int)
                                                                   for x in v):
            raise ValueError(f"{v!r} is not [start, end] (two whole numbers: layers start to end - 1)")
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"{list(v)} is not a layer range: it needs 0 <= start < end (end is excluded)")
        return tuple(v)


class SliceEntry(BaseModel):
    """An output slice: its layers merged from the sources' layer ranges (mergekit's `slices:` form)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None  # mergekit 0.1.5 declares it and never uses it: accepted, said
    parameters: Optional[dict[str, Any]] = None

    _base_ref = field_validator("base_model", mode="before")(ModelEntry._model_ref.__func__)

    @field_validator("sources")
    @classmethod
    def _sources(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source (model and layer_range)")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            shown = ", ".join(f"{s.model} {list(s.layer_range)}" for s in v)
            raise ValueError(f"the sources of a slice must span the same number of layers ({shown})")
        return v


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] = []
    slices: Optional[list[SliceEntry]] = None
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None  # auto, a name (io.chat_templates) or Jinja: merging.templates
    random_seed: Optional[int] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"{v!r} is not one of {', '.join(DTYPES)}")
        return v

    @field_validator("random_seed", mode="before")
    @classmethod
    def _seed(cls, v):
        if isinstance(v, bool):  # pydantic would read true as 1
            raise ValueError(f"{v!r} is not a whole number; give the seed as an integer, e.g. 0")  # noqa: TRY004 - pydantic reports ValueErrors
        return v

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_ref(cls, v):
        return ModelEntry._model_ref(v)

    @model_validator(mode="after")
    def _one_form(self):
        if self.slices is not None and self.models:
            raise ValueError("give either `models:` or `slices:`, not both")
        if self.slices is None and not self.models:
            raise ValueError("`models:` (or `slices:`) is missing or empty: list the models to merge")
        if self.slices is not None and not self.slices:
            raise ValueError("`slices:` is empty: list at least one slice")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer_source:` or a `tokenizer:` block (its `source:`), not both")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def parse_config(data: Union[dict, str, Path], source: str = "config") -> MergeConfig:
    """Parse a dict, YAML text or YAML file; errors name the key and what to do."""
    if isinstance(data, Path) or (isinstance(data, str) and "\n" not in data and data.endswith((".yml", ".yaml"))):
        path = Path(data)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        source = str(path)
        data = path.read_text()
    if isinstance(data, str):
        try:
            data = load_yaml(data, source)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with merge_method and models")
    data = {k: v for k, v in data.items() if k != "provenance"}  # medmerge.yml's record
    for key, why in UNSUPPORTED_KEYS.items():
        if key in data:
            raise ConfigError(f"{source}: key `{key}`: {why}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (not a medmerge/mergekit option)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"`{loc}`: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def evaluate_setting(tensor_name: str, setting: Any, t: float, coerce: Callable[[Any], Any]) -> Any:
    """Resolve one parameter setting for one tensor; None when no condition matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [coerce(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return coerce((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise ConfigError(f"parameter condition {cond!r} needs `value` (and optionally `filter`)")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t, coerce)
        return None
    if setting is None:
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")
