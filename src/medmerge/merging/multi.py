"""A chain of merges in one multi-document YAML file (mergekit-multi's format).

Each document is a merge config; a document with `name: NAME` is an intermediate merge, written to
INTERMEDIATE/NAME, and later documents refer to it by that name wherever a model goes (`models`, `base_model`,
slice sources, `tokenizer_source`). The one document without a name is the final merge, written to OUT.
Merges run in dependency order; a cycle, a duplicated name or a name that is not a plain folder name is
refused before anything is merged.

Intermediates are cached: INTERMEDIATE/NAME holds `medmerge_multi.json` (written inside the atomic output) with the sha256 of its document (its
references resolved) and the fingerprints of its inputs. A re-run reuses an intermediate whose document and
inputs are unchanged, after `verify` recomputes a sample of its tensors; one that changed is merged again. A
folder at INTERMEDIATE/NAME that medmerge did not write there is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import ConfigError, MedmergeError
from ..io.fingerprint import fingerprint
from ..io.writer import output_path
from ..runtime import note
from ..settings import StrictLoader
from .api import merge
from .config import parse_config
from .plan import input_refs, ref_key
from .verify import verify

RECORD = "medmerge_multi.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REUSE_SAMPLE = 0.1  # share of a reused intermediate's tensors that verify recomputes


@dataclass
class Step:
    name: Optional[str]  # None: the final merge
    config: dict  # references to earlier merges replaced by their folders
    needs: list[str]


def read_documents(path: Union[str, Path]) -> list[dict]:
    """The YAML documents of `path` (each a mapping), or a ConfigError naming the file and document."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        docs = [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: document {i + 1} is not a mapping (merge_method, models, ...)")
    return docs


def is_multi(path: Union[str, Path]) -> bool:
    """Several documents, or one with a `name:` (a mergekit-multi file)."""
    docs = read_documents(path)
    return len(docs) > 1 or any("name" in d for d in docs)


def _model_refs(doc: dict) -> list[tuple[Any, str]]:
    """(container, key) of every place a model reference sits in a config document."""
    spots: list[tuple[Any, str]] = []
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and "model" in entry:
            spots.append((entry, "model"))
    for sl in doc.get("slices") or []:
        if isinstance(sl, dict):
            spots += [(src, "model") for src in sl.get("sources") or [] if isinstance(src, dict) and "model" in src]
            if sl.get("base_model") is not None:
                spots.append((sl, "base_model"))
    for key in ("base_model", "tokenizer_source"):
        if doc.get(key) is not None:
            spots.append((doc, key))
    return spots


def plan_steps(docs: list[dict], intermediate: Path, source: str) -> list[Step]:
    """The merges in dependency order; names checked, references to earlier merges replaced by folders."""
    named: dict[str, dict] = {}
    final = []
    for i, doc in enumerate(docs):
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is None:
            final.append(doc)
            continue
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
            raise ConfigError(f"{source}: document {i + 1}: name {name!r} must be a plain folder name (letters, "
                              "digits, '.', '_' or '-', not starting with '.'): it becomes INTERMEDIATE/NAME")
        if name in named:
            raise ConfigError(f"{source}: two documents are named {name!r}; give each intermediate merge its own name")
        named[name] = doc
    if len(final) != 1:
        raise ConfigError(f"{source}: {'no' if not final else len(final)} document(s) without a `name:`; exactly one, "
                          "the final merge (written to OUT), has none")
    steps: dict[Optional[str], Step] = {}
    for name, doc in [*named.items(), (None, final[0])]:
        doc = json.loads(json.dumps(doc))  # a deep copy, references patched below
        needs = []
        for container, key in _model_refs(doc):
            value = container[key]
            ref = value if isinstance(value, str) else None
            if ref is not None and ref in named:
                container[key] = str(intermediate / ref)
                needs.append(ref)
        steps[name] = Step(name, doc, sorted(set(needs)))
    order: list[Step] = []
    state: dict[Optional[str], str] = {}

    def visit(name: Optional[str], path: list) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = " -> ".join(str(n) for n in [*path, name])
            raise ConfigError(f"{source}: the merges depend on each other in a cycle ({cycle})")
        state[name] = "active"
        for dep in steps[name].needs:
            visit(dep, [*path, name])
        state[name] = "done"
        order.append(steps[name])

    for name in [*named, None]:
        visit(name, [])
    return order


def _doc_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _inputs_fingerprint(config: dict, relative_to: Path) -> dict[str, str]:
    cfg = parse_config(config)
    refs, _ = input_refs(cfg)
    out = {}
    for ref in refs:
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else relative_to / path
        out[ref_key(ref)] = fingerprint(path) if path.exists() else "missing"
    return out


def merge_chain(config_path: Union[str, Path], out: Union[str, Path], *, intermediate: Optional[Union[str, Path]] = None,
                lazy: bool = True, force: bool = False, **merge_kwargs) -> list:
    """Run every merge of a multi-document config; intermediates in INTERMEDIATE (default: OUT's sibling
    `<OUT name>.intermediate`), the final merge in OUT. Returns the MergeResults of the merges that ran."""
    config_path = Path(config_path)
    out = output_path(out)
    inter = Path(intermediate).expanduser().absolute() if intermediate else out.with_name(out.name + ".intermediate")
    steps = plan_steps(read_documents(config_path), inter, str(config_path))
    for step in steps:  # every document parses before anything is merged
        parse_config(step.config, f"{config_path} ({step.name or 'final merge'})")
    relative_to = config_path.resolve().parent
    results = []
    for step in steps:
        if step.name is None:  # the final merge: never reused, so its inputs need no fingerprints
            results.append(merge(_with_base(step.config, relative_to), out, force=force, **merge_kwargs))
            continue
        target = inter / step.name
        record = {"name": step.name, "config_sha256": _doc_hash(step.config),
                  "inputs": _inputs_fingerprint(step.config, relative_to)}
        if target.exists():
            previous = target / RECORD
            if not previous.is_file():
                raise MedmergeError(f"{target} exists but was not written by this chain (no {RECORD}); medmerge "
                                    "never replaces it: move it away or choose another --intermediate-dir")
            kept = json.loads(previous.read_text())
            if lazy and {k: kept.get(k) for k in record} == record:
                report = verify(target, sample=REUSE_SAMPLE)
                if report.ok:
                    note(f"intermediate {step.name!r}: unchanged, reused from {target} (verified "
                         f"{len(report.checked)} recomputed tensors)")
                    continue
                note(f"intermediate {step.name!r}: {target} failed verification; merging it again")
            else:
                note(f"intermediate {step.name!r}: its config or inputs changed; merging it again into {target}")
        inter.mkdir(parents=True, exist_ok=True)
        # an intermediate found above is this chain's own (its record says so): replacing it is safe
        results.append(merge(_with_base(step.config, relative_to), target, force=True,
                             extra_files={RECORD: json.dumps(record, indent=2) + "\n"}, **merge_kwargs))
    return results


def _with_base(config: dict, relative_to: Path) -> dict:
    """Relative model paths in the document are relative to the config file (as `medmerge merge FILE` reads them)."""
    doc = json.loads(json.dumps(config))
    for container, key in _model_refs(doc):
        value = container[key]
        if not isinstance(value, str) or (key == "tokenizer_source" and value in ("base", "union")):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and (relative_to / path).exists():
            container[key] = str(relative_to / path)
    return doc
