"""Configuration plumbing shared by every config medmerge reads: the strict base, YAML files, overrides.

Every config (a merge, a training stage, a MedCare stage, a sweep, an experiment) is a
pydantic model derived from `Strict`, so an unknown or misspelt key is an error that
names it; YAML files are read with `read_yaml`, `KEY=VALUE` overrides applied with
`apply_overrides`, and validation errors turned into one line per bad key with
`validation_message`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class Strict(BaseModel):
    """A config section: unknown keys are errors; fields with an alias (`lambda`) also take their Python name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (`1e-3`, `[16, 64]`, `true`); text that is not YAML stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`training.lr=1e-3 lora.r=8 k_shot=64` -> nested updates (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: use KEY=VALUE, e.g. training.lr=1e-3 or lora.r=8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = parse_value(value)
    return raw


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from `path`, or a ConfigError naming the file (`what`: e.g. "training config")."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} is a YAML mapping of keys, not a {type(raw).__name__}")
    return raw


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as 'dotted.key: message; ...'."""
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())


def validated(model: type[BaseModel], raw: dict, where: str | Path):
    """`model(**raw)`, or a ConfigError naming `where` (the file) and each bad key."""
    try:
        return model(**raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {validation_message(e)}") from None
