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


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (plain YAML loaders keep the last value silently)."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} appears twice (lines {first_line} and {line})")
        self.key, self.first_line, self.line = key, first_line, line


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping giving one key twice.

    Keys merged in with `<<: *anchor` are not duplicates (an explicit key overrides them, as YAML says).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader itself says so
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, first, key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str | Path) -> Any:
    """YAML text parsed like yaml.safe_load, but a key given twice in one mapping is a ConfigError naming
    `source` (the file), the key and both lines. Other YAML errors are raised as they are (yaml.YAMLError)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except DuplicateKeyError as e:
        raise ConfigError(f"{source}: {e}: a YAML mapping keeps only the last value, so the first would be "
                          "ignored; remove one of them or merge them into one") from None


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from `path`, or a ConfigError naming the file (`what`: e.g. "training config")."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), path) or {}
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
