"""What a merge records about itself: the resolved config and a model card."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Optional

import yaml

from ..io.checkpoint import split_lora_ref
from ..io.fingerprint import sha256_file
from ..io.folders import copy_support_files as copy_files
from ..io.folders import dtype_name, with_dtype, write_config
from ..runtime import library_versions
from .architecture import LAYER_COUNT_KEYS
from .config import MergeConfig
from .plan import MergePlan, ref_index
from .templates import resolve_template, stopping_problems, write_template

PROVENANCE_KEY = "provenance"
RECORDED_LIBRARIES = ("torch", "transformers", "safetensors")


def input_hashes(plan: MergePlan) -> list[dict]:
    """sha256 of each input's index file (sharded) or of its weight files (single file)."""
    out = []
    for ref, model in zip(plan.model_refs, plan.models):
        path = getattr(model, "path", None)
        entry = {"model": str(path or ref)}
        if getattr(model, "index_file", None) is not None:
            entry["index_sha256"] = sha256_file(model.index_file)
        elif path is not None:
            entry["files_sha256"] = {f.name: sha256_file(f) for f in model.files}
        out.append(entry)
    return out


def resolved_config(plan: MergePlan) -> dict:
    """The config with absolute model paths, every parameter default and the seed filled in."""
    cfg: MergeConfig = plan.config
    paths = [_recorded_ref(m, r) for m, r in zip(plan.models, plan.model_refs)]
    params = dict(cfg.parameters or {})
    for p in plan.method.spec.params:
        if p.name not in params and not p.required and p.default is not None:
            params[p.name] = p.default
    out = {"merge_method": cfg.merge_method}
    if cfg.slices is not None:
        def path_of(ref: str) -> str:
            return paths[ref_index(plan.model_refs, ref)]

        out["slices"] = [{
            "sources": [{"model": path_of(src.model), "layer_range": list(src.layer_range),
                         **({"parameters": src.parameters} if src.parameters else {})} for src in sl.sources],
            **({"base_model": path_of(sl.base_model)} if sl.base_model else {}),
            **({"residual_weight": sl.residual_weight} if sl.residual_weight is not None else {}),
            **({"parameters": sl.parameters} if sl.parameters else {}),
        } for sl in cfg.slices]
    else:
        out["models"] = [
            {"model": paths[i], **({"parameters": m.parameters} if m.parameters else {})}
            for i, m in enumerate(cfg.models)
        ]
        if plan.stats is not None:  # each model's statistics folder, absolute, in its own parameters
            params.pop("stats", None)
            for entry, folder in zip(out["models"], plan.stats):
                entry["parameters"] = {**entry.get("parameters", {}), "stats": str(folder.path.resolve())}
    if cfg.base_model is not None:
        index = ref_index(plan.model_refs, cfg.base_model)
        out["base_model"] = paths[index] if index is not None else cfg.base_model
    out["parameters"] = params
    floats = [tp.out_dtype for tp in plan.tensors if tp.mergeable]
    out["dtype"] = cfg.dtype
    out["out_dtype"] = cfg.out_dtype or (dtype_name(floats[0]) if floats else None)
    if cfg.tokenizer_source is not None:
        src = cfg.tokenizer_source
        out["tokenizer_source"] = src if src in ("base", "union") else paths[ref_index(plan.model_refs, src)]
    if cfg.tokenizer is not None:
        block = cfg.tokenizer.model_dump(exclude_none=True)
        src = cfg.tokenizer.source
        block["source"] = src if src in ("base", "union") else paths[ref_index(plan.model_refs, src)]
        out["tokenizer"] = block
    if cfg.chat_template is not None:
        out["chat_template"] = cfg.chat_template
    out["random_seed"] = plan.seed
    return {k: v for k, v in out.items() if v is not None}


def _recorded_ref(model, ref: str) -> str:
    """An input as the resolved config records it: its absolute folder; a `model+lora` reference stays one (with
    absolute parts), so the record shows the adapter (its cached application is in the input hashes)."""
    lora = split_lora_ref(ref)
    if lora is not None:
        return "+".join(str(Path(part).expanduser().resolve()) for part in lora)
    return str(getattr(model, "path", None) or ref)


def write_provenance(plan: MergePlan, folder: Path, hashes: list[dict], stats: Optional[dict] = None) -> dict:
    resolved = resolved_config(plan)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(*RECORDED_LIBRARIES),
        "inputs": hashes,
        **({"stats": stats} if stats else {}),
        **({"statistics": [{"folder": str(f.path.resolve()), **{k: f.record.get(k) for k in (
            "model_fingerprint", "data", "data_sha256", "examples", "tokens", "kinds")}} for f in plan.stats]}
           if plan.stats is not None else {}),
    }
    doc = {**resolved, PROVENANCE_KEY: record}
    (folder / "medmerge.yml").write_text(
        "# Resolved by medmerge: re-run with `medmerge merge medmerge.yml OUT`,\n"
        "# check with `medmerge verify <this folder>`.\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    (folder / "README.md").write_text(model_card(plan, resolved, record))
    return doc


def model_card(plan: MergePlan, resolved: dict, record: dict) -> str:
    spec = plan.method.spec
    lines = [
        "---",
        "library_name: transformers",
        "tags: [medmerge, merge]",
        "---",
        f"# Merged model ({spec.name})",
        "",
        f"Made with medmerge {record['versions']['medmerge']} on {record['date']}.",
        "",
        "## Method",
        f"`{spec.name}`" + (f" ([reference]({spec.reference}))" if spec.reference else ""),
        "",
        f"    {spec.formula}",
        "",
        "## Inputs",
        "| role | model | sha256 |",
        "|---|---|---|",
    ]
    for i, entry in enumerate(record["inputs"]):
        role = "base" if i == plan.base or (plan.base is None and i == plan.reference and plan.config.base_model) else "input"
        if "index_sha256" in entry:
            digest = f"index: `{entry['index_sha256']}`"
        else:
            digest = ", ".join(f"{k}: `{v}`" for k, v in entry.get("files_sha256", {}).items())
        lines.append(f"| {role} | `{entry['model']}` | {digest} |")
    lines += [
        "",
        "## Configuration (resolved)",
        "```yaml",
        yaml.safe_dump(resolved, sort_keys=False).rstrip(),
        "```",
        "",
        "## Library versions",
        *[f"- {k} {v}" for k, v in record["versions"].items()],
        "",
    ]
    return "\n".join(lines)


def output_model_config(plan: MergePlan) -> dict:
    """config.json of the output: the reference model's, with the output dtype and vocabulary."""
    floats = [tp.out_dtype for tp in plan.tensors if tp.mergeable]
    config = with_dtype(plan.models[plan.reference].config, floats[0] if floats else None)
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.size
    if plan.layer_sources is not None:  # `slices:`: the output's layers, and per-layer settings that follow them
        config = rewrite_layers(config, plan)
    return config


def rewrite_layers(config: dict, plan: MergePlan) -> dict:
    """num_hidden_layers (or the config's layer-count key) = the slices' layers; per-layer lists (layer_types)
    taken from each output layer's source layer in the first source of its slice."""
    config = copy.deepcopy(config)
    holder = config["text_config"] if "text_config" in config and not any(k in config for k in LAYER_COUNT_KEYS) \
        else config
    key = next((k for k in LAYER_COUNT_KEYS if k in holder), "num_hidden_layers")
    old = holder.get(key)
    holder[key] = len(plan.layer_sources)
    for name, value in list(holder.items()):
        if isinstance(value, list) and old is not None and len(value) == old and name != "architectures":
            per_model = [plan.models[i].config.get(name) for i, _ in plan.layer_sources]
            if all(isinstance(v, list) for v in per_model):
                holder[name] = [v[layer] for v, (_, layer) in zip(per_model, plan.layer_sources)]
    return config


def write_model_config(plan: MergePlan, folder: Path) -> None:
    write_config(folder, output_model_config(plan))


def copy_support_files(plan: MergePlan, folder: Path) -> list[str]:
    """Tokenizer and generation config from the reference model (base, else first), the config's
    `chat_template`; returns what would keep generation from stopping (merging.templates), to be said."""
    src = getattr(plan.models[plan.reference], "path", None)
    if plan.vocab is not None:
        plan.vocab.tokenizer.save_pretrained(str(folder))
    if src is not None:
        copy_files(src, folder, tokenizer=plan.vocab is None)
    notes = []
    if plan.config.chat_template:
        paths = [Path(p) for p in (getattr(m, "path", None) for m in plan.models) if p is not None]
        template = resolve_template(plan.config.chat_template, paths)
        if template is None:
            notes.append("chat_template: auto found no template in the inputs; the output keeps the reference's")
        else:
            write_template(folder, template)
    return notes + (stopping_problems(folder, Path(src)) if src is not None else [])


def split_provenance(doc: dict) -> tuple[dict, dict]:
    doc = dict(doc)
    return doc, doc.pop(PROVENANCE_KEY, {}) or {}

