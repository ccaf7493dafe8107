"""Check an adapter merge against the intended combination W0 + sum_i w_i dW_i.

Works on folders written by `medmerge adapters merge` (the inputs and weights
come from their medmerge.yml) and on exports made by any other tool, given the
base and the adapters with their weights. For a full export it reports, per
module, the largest |W_out - (W0 + sum w_i dW_i)|, checks that every other
tensor equals the base's, and names the classic pipeline mistakes when the
export fits them instead of the intended merge:

- the export equals the base: the adapters were not applied;
- the export equals one adapter merged alone (at weight 1 or at its own
  weight): only that adapter was merged, e.g. the SFT-only export that looks
  like the weighted merge.

For an adapter export it compares the exported adapter's delta s * B @ A with
the intended combined delta (exact for `cat`; for an SVD export the residual
must equal the one recorded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.stream import prefetch
from ..merging.verify import TensorCheck, VerifyReport, compare
from ..merging.verify import verify as verify_merge
from ..runtime import progress as progress_bar
from ..settings import load_yaml
from .combine import LINEAR_METHODS, combine
from .inputs import RECORD_KEY, AdapterInputs, open_inputs, parse_adapter_arg
from .lora import CONFIG_NAME, LoraAdapter

ADAPTER_RTOL = 1e-5  # relative Frobenius error allowed for an exact (cat) adapter export, float32 factors


@dataclass
class AdapterVerifyReport(VerifyReport):
    kind: str = "full"
    method: str = "exact"
    pitfalls: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.pitfalls and all(c.ok for c in self.checked)

    def summary(self) -> dict:
        worst = max((c.max_abs for c in self.checked), default=0.0)
        return {"ok": self.ok, "modules_checked": len(self.checked), "max_abs_error": worst,
                "problems": self.problems + self.pitfalls}


def verify_adapter_merge(folder: str | Path, *, inputs: Optional[AdapterInputs] = None,
                         base: Optional[str] = None, adapters: Optional[Sequence[tuple[str, float]]] = None,
                         method: Optional[str] = None, density: Optional[float] = None, seed: Optional[int] = None,
                         allow_missing: bool = False, allow_pickle: bool = False, check_base: bool = True,
                         only: Optional[set[str]] = None, progress: bool = False) -> AdapterVerifyReport:
    """Verify FOLDER; the intended merge comes from `inputs`, else `base` + `adapters`, else FOLDER/medmerge.yml.

    `only`: recompute just these base tensors of a full export (the merge's own
    sampled check; the other tensors were checked byte for byte as written).
    """
    folder = Path(folder)
    record = _read_record(folder)
    rec = record.get(RECORD_KEY, {}) if record else {}
    if inputs is None and adapters is None:
        if not rec:
            raise InputError(f"{folder} has no adapter-merge record (medmerge.yml with {RECORD_KEY}); pass --base "
                             "and --adapter PATH:WEIGHT to say what the export should be")
        base = rec["base"]
        adapters = [(a["path"], a["weight"]) for a in rec["adapters"]]
    method = method or rec.get("method") or "exact"
    density = density if density is not None else rec.get("density")
    seed = seed if seed is not None else rec.get("seed", 0)
    own = inputs is None
    if own:
        if base is None:
            raise InputError("pass --base with --adapter")
        inputs = open_inputs(base, adapters, allow_missing=allow_missing or bool(rec.get("allow_missing")),
                             allow_pickle=allow_pickle, check_base=check_base)
    try:
        if (folder / CONFIG_NAME).is_file():
            return _verify_adapter(folder, inputs, method, density, seed, record, progress)
        return _verify_full(folder, inputs, method, density, seed, progress, only)
    finally:
        if own:
            inputs.close()


def verify_output(folder: str | Path, *, sample: Optional[float] = None, base: Optional[str] = None,
                  adapters: Optional[Sequence[str]] = None, method: Optional[str] = None,
                  density: Optional[float] = None, seed: Optional[int] = None, allow_pickle: bool = False,
                  progress: bool = False) -> VerifyReport:
    """`medmerge verify`: an adapter merge (its record says so, or `adapters` as PATH:WEIGHT say what it should
    be) is checked module by module; any other `medmerge merge` output is recomputed from its medmerge.yml."""
    if sample is not None and not 0 < sample <= 1:
        raise InputError("--sample is a fraction in (0, 1]")
    folder = Path(folder)
    if adapters or RECORD_KEY in _read_record(folder):
        return verify_adapter_merge(folder, base=base, adapters=[parse_adapter_arg(a) for a in adapters or []] or None,
                                    method=method, density=density, seed=seed, allow_pickle=allow_pickle,
                                    progress=progress)
    return verify_merge(folder, sample=sample, allow_pickle=allow_pickle, progress=progress)


def _read_record(folder: Path) -> dict:
    file = folder / "medmerge.yml"
    if not file.is_file():
        return {}
    try:
        record = load_yaml(file.read_text(), file)
    except yaml.YAMLError as e:
        raise InputError(f"{file}: not valid YAML ({e}); it is the merge's record: re-run the merge") from None
    return record if isinstance(record, dict) else {}


def _verify_full(folder: Path, inputs: AdapterInputs, method: str, density, seed: int,
                 progress: bool, only: Optional[set[str]] = None) -> AdapterVerifyReport:
    out = Checkpoint(folder)
    base = inputs.base
    report = AdapterVerifyReport(folder=str(folder), total_tensors=len(base.records), kind="full", method=method)
    missing = [n for n in base.records if n not in out.records]
    extra = [n for n in out.records if n not in base.records]
    if missing:
        report.problems.append(f"the export lacks {len(missing)} tensors of the base, e.g. {missing[0]}")
    if extra:
        report.problems.append(f"the export has {len(extra)} tensors the base lacks, e.g. {extra[0]}")
    hyps = {"base": "the export equals the base: the adapters were not applied"}
    for j, (a, w) in enumerate(zip(inputs.adapters, inputs.weights)):
        hyps[f"one{j}"] = (f"the export equals adapter {a.path} merged alone at weight 1: only one adapter was "
                           "applied (the SFT-only pitfall)")
        if w != 1:
            hyps[f"own{j}"] = (f"the export equals adapter {a.path} merged alone at its weight {w}: the other "
                               "adapters were not applied")
    fits = dict.fromkeys(hyps, True)  # hypothesis matches the export on every module
    same = dict.fromkeys(hyps, True)  # hypothesis is indistinguishable from the intended merge
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task("verifying", total=len(base.records))
        names = [n for n in base.records if n in out.records and (only is None or n in only)]
        pairs = prefetch(lambda n: (out.read(n), base.read(n)), names)
        for name, (actual, w0) in zip(names, pairs):
            bar.advance(task)
            if tuple(actual.shape) != tuple(w0.shape):
                report.problems.append(f"tensor {name}: shape {list(actual.shape)} in the export, {list(w0.shape)} "
                                       "in the base")
                continue
            if name not in inputs.modules:
                if not torch.equal(w0.to(actual.dtype), actual):
                    diff = float((w0.to(torch.float32) - actual.to(torch.float32)).abs().max())
                    report.problems.append(f"tensor {name} is not targeted by any adapter but differs from the "
                                           f"base (max abs {diff:.3g})")
                continue
            # a hypothesis stays of interest while it fits the export on every module so far
            live = [k for k in hyps if fits[k]] if only is None else []  # a sample proves no pitfall either way
            singles = inputs.deltas(name) if any(k != "base" for k in live) else None
            expected = inputs.merged_weight(name, w0, method, density, seed).to(actual.dtype)
            if torch.equal(expected, actual):  # bit-identical (our own exports): nothing to measure
                report.checked.append(TensorCheck(name, 0.0, 0.0, True))
            else:
                max_abs, max_rel, ok = compare(expected, actual)
                report.checked.append(TensorCheck(name, max_abs, max_rel, ok))
            for key in live:
                if key == "base":
                    cand = w0
                else:
                    j = int(key[3:])
                    d = singles[j] if singles[j] is not None else torch.zeros(w0.shape)
                    alpha = 1.0 if key.startswith("one") else inputs.weights[j]
                    cand = w0.to(torch.float32, copy=True).add_(d, alpha=alpha)  # a copy even of a float32 base
                cand = cand.to(actual.dtype)
                fits[key] = torch.equal(cand, actual) or compare(cand, actual)[2]
                if fits[key] and same[key]:
                    same[key] = torch.equal(expected, cand) or compare(expected, cand)[2]
    out.close()
    if report.checked and only is None:
        for key, why in hyps.items():
            if fits[key] and not same[key]:
                report.pitfalls.append(why)
    if method not in LINEAR_METHODS:
        report.notes.append(f"{method}: recomputed with the recorded density and seed")
    return report


def _verify_adapter(folder: Path, inputs: AdapterInputs, method: str, density, seed: int, record: dict,
                    progress: bool) -> AdapterVerifyReport:
    exported = LoraAdapter(folder)
    report = AdapterVerifyReport(folder=str(folder), total_tensors=len(inputs.modules), kind="adapter",
                                 method=method)
    targets = {m.target: name for name, m in exported.modules.items()}
    for t in inputs.modules:
        if t not in targets:
            report.problems.append(f"the exported adapter lacks module {t.removesuffix('.weight')}")
    for t in targets:
        if t not in inputs.modules:
            report.problems.append(f"the exported adapter has module {t.removesuffix('.weight')}, which no input "
                                   "adapter has")
    recorded = ((record or {}).get("stats") or {}).get("svd_relative_residual_per_module", {})
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task("verifying", total=len(inputs.modules))
        for t in inputs.modules:
            bar.advance(task)
            if t not in targets:
                continue
            module = t.removesuffix(".weight")
            expected = combine(inputs.deltas(t), inputs.weights, method, density, seed, module).to(torch.float64)
            actual = exported.delta(targets[t]).to(torch.float64)
            diff = actual - expected
            norm = float(torch.linalg.matrix_norm(expected))
            rel = float(torch.linalg.matrix_norm(diff)) / norm if norm else float(torch.linalg.matrix_norm(diff))
            if method == "cat":
                ok = rel <= ADAPTER_RTOL
            else:
                want = recorded.get(module)
                ok = want is not None and math.isclose(rel, want, rel_tol=1e-3, abs_tol=1e-6)
                if want is None:
                    report.notes.append(f"{module}: no recorded SVD residual to compare with; relative residual "
                                        f"{rel:.3g}")
            report.checked.append(TensorCheck(t, float(diff.abs().max()), rel, ok))
    return report
