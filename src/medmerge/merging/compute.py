"""One output tensor (or a row chunk of one): load inputs, run the kernel, check.

Shared by the streaming executor, the in-memory merger and `verify`, so all
three compute bit-identical results.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError, InputError, MedmergeError
from ..runtime import progress as progress_bar
from .methods.base import CHUNK, TensorInputs
from .plan import MergePlan, TensorPlan


def all_finite(t: torch.Tensor) -> bool:
    """True if no NaN or infinity: a NaN or inf makes the sum non-finite, so one fast
    read-only pass decides (10x faster than isfinite); only a sum that overflows
    needs the exact check."""
    if t.numel() == 0:
        return True
    if torch.isfinite(t.sum()):
        return True
    return bool(torch.isfinite(t).all())


def load_inputs(
    plan: MergePlan, tp: TensorPlan, rows: Optional[tuple[int, int]] = None, check_finite: bool = True
) -> tuple[list[torch.Tensor], bool]:
    """Each model's tensor in the working dtype (after the config's `dtype` cast), and
    whether all of them are fresh buffers that a kernel may overwrite.

    Converting here (in the streaming reader thread) overlaps the casts with the
    kernels and frees each raw buffer as soon as it is converted.
    """
    tensors, fresh = [], []
    for i, source in zip(plan.inputs_of(tp), tp.sources):
        model, ref = plan.models[i], plan.model_refs[i]
        raw = model.read(source, rows)
        t = raw
        if tp.mergeable:
            if plan.load_dtype is not None:
                t = t.to(plan.load_dtype)
            if check_finite and not all_finite(t):
                bad = (~torch.isfinite(t)).sum().item()
                raise InputError(
                    f"tensor {source!r} of model {ref} holds {bad} NaN or infinite value(s); "
                    "repair or replace that checkpoint"
                )
            if not tp.vocab:
                t = t.to(plan.work_dtype)
        fresh.append(getattr(model, "fresh_reads", False) or t is not raw)
        del raw
        tensors.append(t)
    if tp.vocab:
        tensors = [t.to(plan.work_dtype) for t in plan.vocab.align(tensors)]
        fresh = [True] * len(tensors)
    return tensors, all(fresh)


def merge_loaded(
    plan: MergePlan, tp: TensorPlan, tensors: list[torch.Tensor], device: Optional[torch.device] = None,
    owned: bool = False,
) -> torch.Tensor:
    """Run the method on inputs from `load_inputs`; returns the result in the output dtype.

    `owned`: the tensors are fresh buffers the kernel may overwrite. The list is
    emptied, so the caller holds no reference while the kernel runs.
    """
    if not tp.mergeable:
        return _identical(plan, tp, tensors)
    work = [t.to(device=device) for t in tensors]
    owned = owned or all(w.data_ptr() != t.data_ptr() for w, t in zip(work, tensors))
    tensors.clear()
    inputs = TensorInputs(work, plan.base_of(tp), tp.model_params, name=tp.name, seed=plan.seed, owned=owned,
                          stats=load_stats(plan, tp, device), globals=plan_globals(plan, device))
    del work
    try:
        result = plan.method(inputs, tp.global_params)
    except (ValueError, RuntimeError) as e:
        raise MedmergeError(f"merging tensor {tp.name!r} with {plan.method.spec.name}: {e}") from None
    del inputs
    result = result.to(tp.out_dtype)
    if not all_finite(result):
        raise MedmergeError(
            f"merging tensor {tp.name!r} produced NaN or infinite values; check the weights "
            "(for example weights that sum to zero with normalize: true)"
        )
    return result


def plan_globals(plan: MergePlan, device: Optional[torch.device] = None, progress: bool = False) -> Optional[dict]:
    """The method's whole-model statistics (`MethodSpec.prepare`), computed on first use and kept in the plan.

    Each pass streams every floating-point tensor's inputs once (whole tensors, in the working dtype).
    """
    prepare = plan.method.spec.prepare
    if prepare is None or plan.globals is not None:
        return plan.globals
    mergeable = [tp for tp in plan.tensors if tp.mergeable]
    if not mergeable:
        plan.globals = {}
        return plan.globals
    settings = {tuple(sorted(tp.global_params.items())) for tp in mergeable}
    name = plan.method.spec.name
    if len({tuple((k, v) for k, v in s if k != "lam") for s in settings}) > 1:
        raise ConfigError(f"method {name!r} selects over the whole model: give its global parameters one value "
                          "for every tensor (no filters or layer gradients)")
    passes = {"n": 0}

    def each():
        passes["n"] += 1
        with progress_bar(progress, transient=True) as bar:
            task = bar.add_task(f"{name}: whole-model statistics, pass {passes['n']}", total=len(mergeable))
            for tp in mergeable:
                # row chunks where the method streams them (as the merge will read them), else whole tensors
                for rows in row_chunks(tp, CHUNK) if plan.elementwise(tp) else [None]:
                    tensors, owned = load_inputs(plan, tp, rows)
                    work = [t.to(device=device) for t in tensors]
                    # the kernel may overwrite only fresh copies, never an in-memory model's own tensors
                    owned = owned or all(w.data_ptr() != t.data_ptr() for w, t in zip(work, tensors))
                    yield TensorInputs(work, plan.base_of(tp), tp.model_params, name=tp.name, seed=plan.seed,
                                       owned=owned)
                    del tensors, work
                bar.advance(task)

    try:
        plan.globals = prepare(each, mergeable[0].global_params)
    except ValueError as e:
        raise MedmergeError(f"merging with {name}: {e}") from None
    return plan.globals


def load_stats(plan: MergePlan, tp: TensorPlan, device: Optional[torch.device] = None
               ) -> Optional[list[torch.Tensor]]:
    """Each input's statistics of `tp` (methods with `MethodSpec.stats`), or None when it has none."""
    if not tp.stats:
        return None
    kind = plan.method.spec.stats
    return [plan.stats[i].read(kind, src).to(device=device)
            for i, src in zip(plan.inputs_of(tp), tp.sources)]


def _identical(plan: MergePlan, tp: TensorPlan, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A non-float tensor (integer, boolean, quantized) is copied only when every input holds it bit for bit."""
    which = plan.inputs_of(tp)
    first = which.index(plan.reference) if plan.reference in which else 0
    ref = tensors[first]
    for i, t in enumerate(tensors):
        if i != first and not torch.equal(t, ref):
            files = [plan.models[which[k]].records[tp.sources[k]].file for k in (first, i)]
            raise InputError(
                f"tensor {tp.name!r} is {str(ref.dtype).replace('torch.', '')} (not floating point) and differs "
                f"between {plan.model_refs[which[first]]} ({files[0]}) and {plan.model_refs[which[i]]} ({files[1]}): "
                "medmerge cannot merge integer, boolean or quantized tensors, and copies one only when every input "
                "holds the identical tensor; dequantize the models first (e.g. load and re-save them in bfloat16)"
            )
    return ref


def merge_tensor(
    plan: MergePlan, tp: TensorPlan, rows: Optional[tuple[int, int]] = None,
    device: Optional[torch.device] = None, check_finite: bool = True,
) -> torch.Tensor:
    """Load and merge one tensor (or row range) in one call."""
    tensors, owned = load_inputs(plan, tp, rows, check_finite=check_finite)
    return merge_loaded(plan, tp, tensors, device=device, owned=owned)


def row_chunks(tp: TensorPlan, max_elements: int) -> list[Optional[tuple[int, int]]]:
    """Row ranges whose element count stays under `max_elements` (None: whole tensor)."""
    if not tp.shape or tp.shape[0] <= 1:
        return [None]
    row = 1
    for d in tp.shape[1:]:
        row *= d
    per_chunk = max(1, max_elements // max(row, 1))
    if per_chunk >= tp.shape[0]:
        return [None]
    return [(r, min(r + per_chunk, tp.shape[0])) for r in range(0, tp.shape[0], per_chunk)]
