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
in the last. Every other parameter (density, lambda, epsilon, gamma, ...) goes
where the method declares it: per model (both models get it) or top-level.
A point can also be an explicit merge config whose model references are role
names (`base`, `clinical`, `instruct`, ...).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ...errors import ConfigError
from ...merging import methods
from ...merging.methods.base import GLOBAL


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
        return self.method + " " + " ".join(f"{k}={_short(v)}" for k, v in self.params.items())


def _short(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _complement(t):
    if isinstance(t, list):
        return [round(1.0 - float(x), 12) for x in t]
    return round(1.0 - float(t), 12)


def build_config(method: str, params: dict[str, Any], roles: Roles) -> dict:
    """The merge config of `method` at `params` over the roles' models."""
    try:
        spec = methods.get(method).spec
    except KeyError as e:
        raise ConfigError(f"sweep: {e.args[0]}") from None
    declared = {p.name: p for p in spec.params}
    params = dict(params)
    t = params.pop("t", None)
    per_model: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for name, value in params.items():
        if name not in declared:
            raise ConfigError(f"sweep: method {method} has no parameter {name!r}; it takes t (the domain model's "
                              f"share) and {', '.join(sorted(declared)) or 'nothing else'}")
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
            pts = [Point(method=cfg["merge_method"], config=cfg, label=entry.get("label"))]
        else:
            method = entry.pop("method", None)
            if not method:
                raise ConfigError(f"sweep: grid[{i}] needs `method` (e.g. linear, slerp, ties) or `config`")
            # each axis is a list of values; a value that is itself a list is a per-layer gradient
            # (`t: [0, 0.5, 1]` is three points, `t: [[0.2, 0.8]]` one point with a gradient)
            axes = {k: v if isinstance(v, list) else [v] for k, v in entry.items()}
            names = list(axes)
            pts = [Point(method=method, params=dict(zip(names, combo))) for combo in itertools.product(*axes.values())]
        for p in pts:
            key = json.dumps([p.method, p.params, p.config], sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def point_key(config: dict, fingerprints: dict[str, str]) -> str:
    """Hash of a merge config with each role replaced by its input model's content fingerprint."""
    blob = json.dumps({"config": config, "inputs": {r: fingerprints.get(r) for r in sorted(fingerprints)}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layer_gradient(values: Sequence[float]) -> list[float] | float:
    """Per-layer-group values -> a mergekit gradient (a single group is a scalar)."""
    vals = [round(float(v), 6) for v in values]
    return vals[0] if len(vals) == 1 else vals


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
