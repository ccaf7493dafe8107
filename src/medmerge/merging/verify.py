"""Check a merged folder against its recorded config and inputs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.fingerprint import sha256_file
from ..runtime import cache_root, track
from ..settings import load_yaml
from .compute import all_finite, merge_tensor, row_chunks
from .config import parse_config
from .execute import CHUNK_ELEMENTS
from .methods.base import CHUNK
from .plan import MergePlan, TensorPlan, build_plan, input_refs, open_models
from .provenance import split_provenance


@dataclass
class TensorCheck:
    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class VerifyReport:
    folder: str
    checked: list[TensorCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_tensors: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checked)

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance: a few units in the last place of the output dtype."""
    return 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def compare(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, float, bool]:
    """(largest abs error, largest relative error, within tolerance), chunk by chunk so
    that comparing a large embedding needs no full-size float64 copies."""
    if not expected.dtype.is_floating_point:
        same = torch.equal(expected, actual)
        return (0.0 if same else math.inf), (0.0 if same else math.inf), same
    e, a = expected.reshape(-1), actual.reshape(-1)
    if e.numel() == 0:
        return 0.0, 0.0, True
    work = torch.float64 if e.dtype == torch.float64 else torch.float32
    mean_abs = float(e.abs().sum(dtype=torch.float64)) / e.numel()
    tol = tolerance(expected.dtype)
    max_abs = max_rel = 0.0
    ok = True
    for start in range(0, e.numel(), CHUNK):
        ec, ac = e[start : start + CHUNK].to(work), a[start : start + CHUNK].to(work)
        diff = (ec - ac).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / ec.abs().clamp(min=1e-12)).max()))
        # a few ulps of each element, or of the tensor's mean magnitude for near-zero elements
        ok = ok and bool((diff <= tol * (ec.abs() + mean_abs)).all())
    return max_abs, max_rel, ok


def recompute(plan: MergePlan, tp: TensorPlan) -> torch.Tensor:
    """The tensor exactly as the streaming executor computes it (same row chunks)."""
    chunks = row_chunks(tp, CHUNK_ELEMENTS) if plan.elementwise(tp) else [None]
    parts = [merge_tensor(plan, tp, rows) for rows in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def structural_checks(
    plan: MergePlan, out: Checkpoint, report: VerifyReport, config_shapes: Optional["ConfigShapes"] = None
) -> None:
    expected = {tp.name: tp for tp in plan.tensors}
    for name in sorted(set(expected) - set(out.records)):
        report.problems.append(f"tensor {name} is missing from the output")
    for name in sorted(set(out.records) - set(expected)):
        report.problems.append(f"tensor {name} is in the output but not in the plan")
    for name, tp in expected.items():
        rec = out.records.get(name)
        if rec is None:
            continue
        if tuple(rec.shape) != tuple(tp.shape):
            report.problems.append(f"tensor {name}: shape {list(rec.shape)}, expected {list(tp.shape)}")
        if rec.torch_dtype != tp.out_dtype:
            report.problems.append(f"tensor {name}: dtype {rec.torch_dtype}, expected {tp.out_dtype}")
    dtype = out.config.get("dtype") or out.config.get("torch_dtype")
    floats = {rec.torch_dtype for rec in out.records.values() if rec.torch_dtype.is_floating_point}
    if dtype and floats and floats != {getattr(torch, dtype, None)}:
        report.problems.append(f"config.json says dtype {dtype} but float tensors are {sorted(map(str, floats))}")
    if config_shapes is None:
        config_shapes = ConfigShapes.from_config(out.config)
    config_shapes.check({name: rec.shape for name, rec in out.records.items()}, report)


@dataclass
class ConfigShapes:
    """The tensor shapes transformers builds from a config.json (meta device, no memory)."""

    shapes: Optional[dict[str, tuple]] = None
    tied: bool = False
    note: Optional[str] = None

    @classmethod
    def from_config(cls, config: dict) -> "ConfigShapes":
        """The shapes, from the cache (`config_shapes/` in medmerge's cache folder, keyed by the config and the
        installed transformers and torch versions) or built now (importing transformers: about a second, the
        largest fixed cost of a small merge) and cached for the next merge of that architecture."""
        config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        key = hashlib.sha256(json.dumps([config, version("transformers"), torch.__version__], sort_keys=True,
                                        default=str).encode()).hexdigest()[:24]
        cached = cache_root() / "config_shapes" / f"{key}.json"
        try:
            hit = json.loads(cached.read_text())
            return cls(shapes={k: tuple(v) for k, v in hit["shapes"].items()}, tied=bool(hit["tied"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        try:  # deferred: transformers takes seconds to import, and an unknown architecture is only noted
            from transformers import AutoConfig, AutoModelForCausalLM

            config = dict(config)
            model_type = config.pop("model_type")
            cfg = AutoConfig.for_model(model_type, **config)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
        except Exception as e:  # noqa: BLE001 - unknown architectures are only noted
            return cls(note=f"shapes not checked against transformers ({type(e).__name__}: {e})")
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        result = cls(shapes=shapes, tied=bool(getattr(cfg, "tie_word_embeddings", False)))
        try:  # written whole under a private name, then renamed: concurrent merges never read half a file
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps({"shapes": shapes, "tied": result.tied}))
            os.replace(tmp, cached)
        except OSError:  # a read-only cache only costs the next merge the import
            pass
        return result

    def check(self, actual: dict[str, tuple], report: VerifyReport) -> None:
        if self.shapes is None:
            report.notes.append(self.note or "shapes not checked against transformers")
            return
        for name, shape in actual.items():
            want = self.shapes.get(name)
            if want is not None and tuple(want) != tuple(shape):
                report.problems.append(f"tensor {name}: shape {list(shape)} but config.json implies {list(want)}")
        for name in self.shapes:
            if name not in actual and not (self.tied and name.endswith("lm_head.weight")):
                report.problems.append(f"transformers expects tensor {name}, which the output lacks")


def verify_plan(
    plan: MergePlan,
    folder: Path,
    *,
    sample: Optional[float] = None,
    max_tensors: Optional[int] = None,  # quick mode: this many tensors of at most median size
    check_all_finite: bool = True,
    seed: int = 0,
    progress: bool = False,
    config_shapes: Optional[ConfigShapes] = None,
) -> VerifyReport:
    folder = Path(folder)
    out = Checkpoint(folder)
    report = VerifyReport(folder=str(folder), total_tensors=len(plan.tensors))
    structural_checks(plan, out, report, config_shapes)
    present = [tp for tp in plan.tensors if tp.name in out.records]
    chosen = present
    if max_tensors is not None:
        # A quick check: sample at most `max_tensors`, from the tensors no larger than
        # the median, so it never recomputes the embedding of a large model.
        sizes = sorted(tp.nbytes for tp in present)
        median = sizes[len(sizes) // 2] if sizes else 0
        pool = [tp for tp in present if tp.nbytes <= median]
        chosen = random.Random(seed).sample(pool, min(max_tensors, len(pool)))
    elif sample is not None and sample < 1:
        k = max(1, math.ceil(sample * len(present)))
        chosen = random.Random(seed).sample(present, min(k, len(present)))
    chosen_names = {tp.name for tp in chosen}
    for tp in track(present, "verifying", progress, label=lambda tp: tp.name):
        if tp.name not in chosen_names and not check_all_finite:
            continue
        actual = out.read(tp.name)
        if actual.dtype.is_floating_point and not all_finite(actual):
            report.problems.append(f"tensor {tp.name} holds NaN or infinite values")
            continue
        if tp.name in chosen_names:
            max_abs, max_rel, ok = compare(recompute(plan, tp), actual)
            report.checked.append(TensorCheck(tp.name, max_abs, max_rel, ok))
    out.close()
    return report


def verify(
    folder,
    *,
    sample: Optional[float] = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    check_hashes: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Recompute every tensor (or a `sample` fraction) of a medmerge output and compare."""
    folder = Path(folder)
    record_file = folder / "medmerge.yml"
    if not record_file.is_file():
        raise InputError(f"{folder} has no medmerge.yml: only folders written by `medmerge merge` can be verified")
    try:
        doc = load_yaml(record_file.read_text(), record_file)
    except yaml.YAMLError as e:
        raise InputError(f"{record_file}: not valid YAML ({e}); it is the merge's record: re-run the merge") from None
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else f"a {type(doc).__name__}"
        raise InputError(f"{record_file}: the merge's record is {kind}, not a mapping with merge_method and models "
                         "(it was edited or damaged); re-run the merge, or restore medmerge.yml from a copy")
    doc, provenance = split_provenance(doc)
    if not isinstance(provenance, dict):
        raise InputError(f"{record_file}: `provenance` is a {type(provenance).__name__}, not the mapping medmerge "
                         "writes; re-run the merge")
    config = parse_config(doc, source=str(record_file))
    refs, _ = input_refs(config)
    models = open_models(refs, allow_pickle=allow_pickle)
    notes = []
    if check_hashes:
        notes = _compare_hashes(models, provenance.get("inputs", []))
    plan = build_plan(config, models, trust_remote_code=trust_remote_code)
    report = verify_plan(plan, folder, sample=sample, seed=plan.seed, progress=progress)
    report.problems[:0] = notes
    return report


def _compare_hashes(models, recorded: list[dict]) -> list[str]:
    problems = []
    for model, entry in zip(models, recorded):
        if "index_sha256" in entry and model.index_file is not None:
            if sha256_file(model.index_file) != entry["index_sha256"]:
                problems.append(f"input {model.path}: index file changed since the merge (sha256 differs)")
        for name, digest in entry.get("files_sha256", {}).items():
            file = model.path / name
            if not file.is_file() or sha256_file(file) != digest:
                problems.append(f"input {model.path}: {name} changed since the merge (sha256 differs)")
    return problems
