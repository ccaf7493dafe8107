"""The task-vector family: task arithmetic, TIES, DARE, Breadcrumbs, DELLA.

All share one kernel (as in mergekit 0.1.5): delta_i = W_i - B is sparsified,
weighted, optionally filtered by sign consensus, summed, optionally normalized,
scaled by lambda and added to the base B.
"""

from functools import partial
from typing import Optional

import torch

from . import sparsify
from .base import (
    CHUNK,
    FRACTION,
    PER_NON_BASE,
    Domain,
    MergeMethod,
    MethodSpec,
    Param,
    TensorInputs,
)


def _sparsify(x: TensorInputs, row: int, delta: torch.Tensor, mp: dict, method: str, mode) -> torch.Tensor:
    density = mp["density"]
    if method == "magnitude":
        return sparsify.magnitude(delta, density, mode)
    if method == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, density, mp["gamma"], mode)
    # One random stream per (seed, tensor, input position): independent of execution order.
    stream = sparsify.UniformStream(x.stream_seed(row))
    if method == "random":
        return sparsify.bernoulli(delta, density, stream, mode)
    return sparsify.della_magprune(delta, density, mp["epsilon"], stream, mode, where=f" ({x.name})")


def generalized_task_arithmetic(
    x: TensorInputs, p: dict, *, sparsification: Optional[str], consensus: Optional[str]
) -> torch.Tensor:
    base = x.tensors[x.base]
    others = x.non_base
    if not others:
        return base
    mode = p.get("rescale_mode", "l1") if p["rescale"] else None
    weights = [float(x.model_params[i]["weight"]) for i in others]
    # (tensor, factor still to apply): (w_k * delta_k, 1), or (delta_k, w_k) when signs
    # are elected on unweighted deltas. In place when the inputs are ours to overwrite.
    weighted = []
    for row, i in enumerate(others):
        delta = (x.tensors[i].sub_(base) if x.owned else x.tensors[i] - base).contiguous()
        if sparsification:
            delta = _sparsify(x, row, delta, x.model_params[i], sparsification, mode)
        if p.get("sign_election") == "unweighted":
            weighted.append((delta, weights[row]))
        else:
            weighted.append((delta.mul_(weights[row]), 1.0))

    # The combination is elementwise: run it in chunks, writing into the base's buffer,
    # so its temporaries (votes, elected signs, agreement, sums) stay chunk-sized.
    out = base.contiguous() if x.owned else base.clone(memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    flat = [(tensor.reshape(-1), factor) for tensor, factor in weighted]
    del weighted
    by_count = p.get("disjoint_mean", "weights") == "count"
    total = sum(weights)
    for start in range(0, flat_out.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        mixed = torch.zeros_like(flat_out[part])
        if consensus:
            votes = torch.zeros_like(mixed)
            for tensor, _ in flat:
                votes.add_(tensor[part] if consensus == "sum" else tensor[part].sign())
            # the elected sign as +1/-1 (ties go to +1); float masks beat boolean ones on CPU
            elected = (votes >= 0).to(mixed.dtype).mul_(2).sub_(1)
            del votes
            divisor = torch.zeros_like(mixed)
            for (tensor, factor), w in zip(flat, weights):
                agree = tensor[part].sign().mul_(elected).clamp_(min=0)  # 1 where signs agree; 0 for zeros
                mixed.add_(tensor[part].mul_(agree), alpha=factor)
                divisor.add_(agree, alpha=1.0 if by_count else w)
            divisor[divisor == 0] = 1
        else:
            for tensor, factor in flat:
                mixed.add_(tensor[part], alpha=factor)
            divisor = total if abs(total) >= 1e-8 else 1.0
        if p["normalize"]:
            mixed.div_(divisor)
        if p["lambda"] != 1:
            mixed.mul_(p["lambda"])
        flat_out[part].add_(mixed)
    return out


def _no_sparsification(g: dict, models: list) -> bool:
    return all(m.get("density", 1.0) >= 1 for m in models)


def _della_check(g: dict, models: list) -> str | None:
    """MagPrune's keep probabilities density +/- epsilon must lie in (0, 1) wherever something is dropped."""
    for ref, p in models:
        density, epsilon = p.get("density", 1.0), p.get("epsilon", 0.0)
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            return (f"della: model {ref}: density {density:g} +/- epsilon {epsilon:g} must lie in (0, 1); "
                    "lower epsilon or move density toward 0.5")
    return None


def _family_member(
    name: str,
    sparsification: Optional[str],
    consensus: Optional[str],
    normalize: bool,
    rescale: bool,
    formula: str,
    reference: str,
) -> MergeMethod:
    params = [
        Param("weight", float, PER_NON_BASE, doc="weight w_i of each task vector"),
        Param("density", float, PER_NON_BASE, default=1.0, domain=FRACTION, doc="fraction of each task vector kept"),
        Param("lambda", float, default=1.0, doc="scale of the merged task vector"),
        Param("normalize", bool, default=normalize, doc="divide by the (consensus) sum of weights"),
        Param("rescale", bool, default=rescale, doc="rescale kept entries after sparsification"),
        Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no effect"),
    ]
    if sparsification:
        params.append(
            Param(
                "rescale_mode",
                str,
                default="l1",
                choices=("l1", "inverse_density"),
                doc="l1: match the L1 norm (mergekit); inverse_density: divide by keep probability (papers)",
            )
        )
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, PER_NON_BASE, default=0.01, domain=Domain(0.0, 1.0, high_open=True),
                            doc="fraction of largest entries dropped"))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", float, PER_NON_BASE, default=0.15, domain=Domain(0.0, 0.5, high_open=True),
                            doc="spread of keep probabilities: density +/- epsilon must lie in (0, 1)"))
    if consensus:
        params.append(
            Param(
                "sign_election",
                str,
                default="weighted",
                choices=("weighted", "unweighted"),
                doc="elect signs on weighted deltas (mergekit) or on the trimmed deltas (TIES paper)",
            )
        )
        params.append(
            Param(
                "disjoint_mean",
                str,
                default="weights",
                choices=("weights", "count"),
                doc="normalize by the agreeing weights (mergekit) or by the agreeing count (TIES paper)",
            )
        )
    return MergeMethod(
        MethodSpec(
            name=name,
            params=tuple(params),
            base="required",
            min_inputs=1,
            random=sparsification in ("random", "della_magprune"),
            elementwise=_no_sparsification,
            formula=formula,
            reference=reference,
            check=_della_check if sparsification == "della_magprune" else (lambda g, m: None),
            memory=("streamed by rows when nothing is dropped (every density 1); otherwise whole tensor: the N "
                    "task vectors, their masks, and sums built chunk by chunk"),
        ),
        partial(generalized_task_arithmetic, sparsification=sparsification, consensus=consensus),
    )


_TA = "delta_i = W_i - B; W = B + lambda * sum_i w_i delta_i (/ sum_i w_i if normalize)"
_TIES = (
    "delta_i = trim_density(W_i - B) (keep the top-density fraction by |.|); "
    "s = sign(sum_i w_i delta_i); m_i = [sign(delta_i) = s]; "
    "W = B + lambda * sum_i w_i m_i delta_i / sum_i w_i m_i (normalize)"
)
_DARE = "delta_i = drop_density(W_i - B) (keep each entry with probability density), rescaled; "

METHODS = [
    _family_member("task_arithmetic", None, None, False, False, _TA, "https://arxiv.org/abs/2212.04089"),
    _family_member("ties", "magnitude", "sum", True, False, _TIES, "https://arxiv.org/abs/2306.01708"),
    _family_member(
        "dare_ties", "random", "sum", False, True, _DARE + "then TIES sign consensus and sum",
        "https://arxiv.org/abs/2311.03099",
    ),
    _family_member(
        "dare_linear", "random", None, False, True, _DARE + "then " + _TA.split("; ", 1)[1],
        "https://arxiv.org/abs/2311.03099",
    ),
    _family_member(
        "breadcrumbs", "magnitude_outliers", None, False, False,
        "delta_i = W_i - B with the gamma largest and the (1 - density - gamma) smallest entries "
        "removed; W = B + lambda * sum_i w_i delta_i", "https://arxiv.org/abs/2312.06795",
    ),
    _family_member(
        "breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
        "Breadcrumbs sparsification, then TIES sign consensus", "https://arxiv.org/abs/2312.06795",
    ),
    _family_member(
        "della", "della_magprune", "sum", True, True,
        "delta_i = MagPrune(W_i - B): keep probability density +/- epsilon by magnitude rank per row, "
        "rescaled; then TIES sign consensus and normalized sum", "https://arxiv.org/abs/2406.11617",
    ),
    _family_member(
        "della_linear", "della_magprune", None, False, True,
        "MagPrune sparsification, then a weighted sum of task vectors", "https://arxiv.org/abs/2406.11617",
    ),
]
