"""Sweep points: a method plus parameter values, turned into a mergekit-style merge config.

One axis is common to every method, the interpolation weight `t`: the share of
the *domain* (clinical) model, the general (instruct) model getting 1 - t.

- linear, nuslerp: weights (t, 1 - t) on the two models;
- slerp: base_model = general, t = t (t = 0 is the general model, t = 1 the domain model);
- task-vector methods (task_arithmetic, ties, dare_*, della*, breadcrumbs*):
  base_model = the shared ancestor, weights (t, 1 - t) on the two task vectors;
- model_stock: no t (the method picks its own ratio).

`t` may be a list: a per-layer gradient (mergekit's `weight: [a, b, ...]`),
so `[0.2, 0.8]` moves from mostly general in the first layers to mostly domain
in the last. `t` is a share, in [0, 1], unless the point sets
`allow_extrapolation: true`. Every other parameter (density, lambda, epsilon,
gamma, ...) goes where the method declares it: per model (both models get it)
or top-level, and must be a number (or a list of numbers) where the method
takes one; its domain is the method's (`medmerge methods`). A point can also be
an explicit merge config whose model references are role names (`base`,
`clinical`, `instruct`, ...).

`check_point` runs every check that needs no model on one point, so a whole grid
is checked before anything is evaluated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ...errors import ConfigError, MedmergeError
from ...merging import methods
from ...merging.config import parse_config
from ...merging.methods.base import GLOBAL
from ...merging.plan import check_config, input_refs

EXTRAPOLATE = "allow_extrapolation"  # a point's opt-in to t outside [0, 1]


@dataclass(frozen=True)
class Roles:
    domain: str = "clinical"
    general: str = "instruct"
    base: str = "base"


@dataclass
class Point:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    config: Optional[dict] = None  # an explicit merge config instead of method + params
    label: Optional[str] = None

    def merge_config(self, roles: Roles, seed: int, dtype: Optional[str] = None) -> dict:
        cfg = dict(self.config) if self.config is not None else build_config(self.method, self.params, roles)
        cfg.setdefault("random_seed", seed)
        if dtype:
            cfg.setdefault("dtype", dtype)
        return cfg

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.config is not None:
            return f"{self.method} (explicit config)"
        return self.method + " " + " ".join(f"{k}={short(v)}" for k, v in self.params.items())


def short(v) -> str:
    """A parameter value as labels show it (floats with %g, lists in brackets)."""
    if isinstance(v, list):
        return "[" + ",".join(short(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _complement(t):
    if isinstance(t, list):
        return [round(1.0 - float(x), 12) for x in t]
    return round(1.0 - float(t), 12)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(method: str, name: str, value, kind: type) -> None:
    """A numeric parameter's value is a number or a non-empty list of numbers (a per-layer gradient);
    a bool parameter's is true or false."""
    if kind in (float, int):
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if not _is_number(v)] if values else [value]
        if bad:
            raise ConfigError(f"sweep: {method} {name}={value!r}: {bad[0]!r} is not a number; give {name} as a "
                              f"number, or a list of numbers for a per-layer gradient (e.g. {name}: [[0.2, 0.8]] in "
                              "a grid entry)")
    elif kind is bool and not isinstance(value, bool):
        raise ConfigError(f"sweep: {method} {name}={value!r} is not true or false")


def _check_share(method: str, t, extrapolate: bool) -> None:
    """t is the domain model's share: every value (each gradient point) in [0, 1] unless extrapolating."""
    _check_value(method, "t", t, float)
    for v in t if isinstance(t, list) else [t]:
        if not math.isfinite(v) or (not extrapolate and not 0 <= v <= 1):
            raise ConfigError(
                f"sweep: {method} t={short(t)}: {v!r} is outside [0, 1]: t is the domain model's share "
                "(0 = the general model, 1 = the domain model)"
                + ("" if not math.isfinite(v) else f"; set `{EXTRAPOLATE}: true` in that grid entry to go beyond "
                   "the two models"))


def build_config(method: str, params: dict[str, Any], roles: Roles) -> dict:
    """The merge config of `method` at `params` over the roles' models."""
    try:
        spec = methods.get(method).spec
    except KeyError as e:
        raise ConfigError(f"sweep: {e.args[0]}") from None
    declared = {p.name: p for p in spec.params}
    params = dict(params)
    t = params.pop("t", None)
    extrapolate = params.pop(EXTRAPOLATE, False)
    _check_value(method, EXTRAPOLATE, extrapolate, bool)
    if t is not None:
        _check_share(method, t, extrapolate)
    per_model: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if extrapolate and EXTRAPOLATE in declared:  # the method's own switch (slerp, nuslerp)
        top[EXTRAPOLATE] = True
    for name, value in params.items():
        if name not in declared:
            raise ConfigError(f"sweep: method {method} has no parameter {name!r}; it takes t (the domain model's "
                              f"share) and {', '.join(sorted(declared)) or 'nothing else'}")
        _check_value(method, name, value, declared[name].type)
        (top if declared[name].scope == GLOBAL else per_model)[name] = value
    if method == "slerp":
        if t is None:
            raise ConfigError("sweep: slerp needs t (0 = the general model, 1 = the domain model)")
        top["t"] = t
        cfg = {"merge_method": "slerp", "base_model": roles.general,
               "models": [{"model": roles.general}, {"model": roles.domain}]}
    elif method == "model_stock":
        if t is not None:
            raise ConfigError("sweep: model_stock chooses its own ratio; drop t")
        cfg = {"merge_method": method, "base_model": roles.base,
               "models": [{"model": roles.domain}, {"model": roles.general}]}
    else:
        if t is None:
            raise ConfigError(f"sweep: {method} needs t, the domain model's weight (the general model gets 1 - t)")
        models = [{"model": roles.domain, "parameters": {"weight": t, **per_model}},
                  {"model": roles.general, "parameters": {"weight": _complement(t), **per_model}}]
        cfg = {"merge_method": method, "models": models}
        if spec.base == "required":
            cfg["base_model"] = roles.base
    if top:
        cfg["parameters"] = top
    return cfg


def expand_grid(entries: Sequence[dict]) -> list[Point]:
    """Grid entries -> points: the cartesian product of each entry's value lists, in order, without repeats."""
    points: list[Point] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        entry = dict(entry)
        if "config" in entry:
            cfg = entry["config"]
            if not isinstance(cfg, dict) or "merge_method" not in cfg:
                raise ConfigError(f"sweep: grid[{i}].config must be a merge config with merge_method and models")
            extra = sorted(set(entry) - {"config", "label"})
            if extra:
                raise ConfigError(f"sweep: grid[{i}]: {', '.join(extra)}: a `config:` entry takes only `config` and "
                                  "`label`; put parameters inside the merge config")
            pts = [Point(method=cfg["merge_method"], config=cfg, label=entry.get("label"))]
        else:
            method = entry.pop("method", None)
            if not method:
                raise ConfigError(f"sweep: grid[{i}] needs `method` (e.g. linear, slerp, ties) or `config`")
            if not isinstance(method, str):
                raise ConfigError(f"sweep: grid[{i}].method must be one method name, not {method!r}; "
                                  "write one grid entry per method")
            # each axis is a list of values; a value that is itself a list is a per-layer gradient
            # (`t: [0, 0.5, 1]` is three points, `t: [[0.2, 0.8]]` one point with a gradient)
            axes = {k: v if isinstance(v, list) else [v] for k, v in entry.items()}
            empty = [k for k, v in axes.items() if not v]
            if empty:
                raise ConfigError(f"sweep: grid[{i}].{empty[0]} is an empty list: give it at least one value")
            names = list(axes)
            pts = [Point(method=method, params=dict(zip(names, combo))) for combo in itertools.product(*axes.values())]
        for p in pts:
            key = json.dumps([p.method, p.params, p.config], sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def check_point(point: Point, roles: Roles, models: Sequence[str], seed: int = 0, dtype: str | None = None) -> dict:
    """Every check of one point that needs no model, or a ConfigError naming the point; returns its merge config.

    Values are numbers where the method takes numbers, t is a share, every parameter lies in the
    method's domain (the merge engine's own checks, `merging.plan.check_config`), and the config
    names only models of the sweep.
    """
    try:
        config = point.merge_config(roles, seed, dtype)
        parsed = parse_config(config, source="merge config")
        check_config(parsed)
    except MedmergeError as e:
        text = str(e).removeprefix("sweep: ")
        raise ConfigError(f"sweep: point {point.describe()!r}: {text}") from None
    refs, _ = input_refs(parsed)
    unknown = [r for r in refs if r not in models]
    if unknown:
        raise ConfigError(f"sweep: point {point.describe()!r} names model {unknown[0]!r}, which is not one of the "
                          f"sweep's models ({', '.join(models)}); use their names (roles) in merge configs")
    return config


def roles_used(config: dict) -> set[str]:
    """The roles a merge config reads: its models, base model and tokenizer source (engine keywords aside)."""
    used = {m["model"] for m in config.get("models", [])}
    used |= {config[k] for k in ("base_model", "tokenizer_source")
             if isinstance(config.get(k), str) and config[k] not in ("base", "union")}
    return used


def point_key(config: dict, fingerprints: dict[str, str], always: tuple[str, ...] = ()) -> str:
    """Hash of a merge config with each role it reads (and the `always` roles: the loaded model, whose config and
    tokenizer every point is scored with) replaced by its input model's content fingerprint. Models a point does not
    read are not in its key, so sweeps that share a cache share the points they have in common (a reference)."""
    used = roles_used(config) | set(always)
    blob = json.dumps({"config": config, "inputs": {r: fingerprints.get(r) for r in sorted(fingerprints) if r in used}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layer_gradient(values: Sequence[float]) -> list[float] | float:
    """Per-layer-group values -> a mergekit gradient (a single group is a scalar)."""
    vals = [round(float(v), 6) for v in values]
    return vals[0] if len(vals) == 1 else vals


def other_params(row: dict) -> str:
    """A scored row's parameters but t, as labels show them ("density=0.9 lambda=1.8")."""
    return " ".join(f"{k}={short(v)}" for k, v in sorted((row.get("params") or {}).items()) if k != "t")


def setting(row: dict) -> str:
    """A scored row's method and every parameter but t ("task_arithmetic lambda=1.8"): the points of one curve
    against t."""
    return f"{row['method']} {other_params(row)}".strip()


def t_value(row: dict):
    """A scored row's interpolation weight t, when it is one number (not a per-layer gradient)."""
    t = (row.get("params") or {}).get("t")
    return t if isinstance(t, (int, float)) else None


def with_paths(config: dict, models: dict[str, Path]) -> dict:
    """A merge config with role names replaced by the models' folders (for the on-disk engine)."""
    def sub(ref):
        return str(models[ref]) if ref in models else ref

    cfg = json.loads(json.dumps(config))
    for m in cfg["models"]:
        m["model"] = sub(m["model"])
    if cfg.get("base_model"):
        cfg["base_model"] = sub(cfg["base_model"])
    if cfg.get("tokenizer_source") not in (None, "base", "union"):  # keywords of the engine, not roles
        cfg["tokenizer_source"] = sub(cfg["tokenizer_source"])
    return cfg
