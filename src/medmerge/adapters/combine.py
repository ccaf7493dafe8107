"""Weighted combinations of LoRA weight deltas, module by module.

Every method acts on the deltas dW_i = s_i * B_i @ A_i, never on the factors:

- exact, cat, svd: dW = sum_i w_i dW_i (they differ only in how the result is
  exported: full weights, an exact adapter of rank sum r_i, or a rank-R SVD).
- magnitude_prune: sum_i w_i prune(dW_i), keeping the `density` fraction of
  entries of largest magnitude in each dW_i.
- ties: prune each dW_i by magnitude; elect a sign per entry from the sum of the
  pruned deltas; average the weighted deltas that agree with it (disjoint mean
  over the agreeing count).
- dare_linear: drop each entry of each dW_i with probability 1 - density,
  rescale the survivors by 1 / density, sum with weights.
- dare_ties: DARE's drop and rescale, then TIES' sign election and disjoint mean.

These are PEFT's `merge_utils` semantics (magnitude_prune, ties, dare_linear,
dare_ties with majority_sign_method="total"), which PEFT itself applies to the
factors A and B separately unless the `_svd` variant is chosen; here they are
applied to dW. Tests compare with PEFT's functions on the deltas. DARE's drops
come from a PCG64 stream per (seed, module, adapter), so a merge is
reproducible from its recorded seed on any machine and thread count.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..merging.methods import sparsify
from ..merging.methods.base import tensor_seed

METHODS = ("exact", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
LINEAR_METHODS = ("exact", "cat", "svd")


def stream(seed: int, module: str, index: int) -> sparsify.UniformStream:
    return sparsify.UniformStream(tensor_seed(seed, f"{module}\x00adapter{index}"))


def combine(deltas: Sequence[Optional[torch.Tensor]], weights: Sequence[float], method: str,
            density: Optional[float] = None, seed: int = 0, module: str = "") -> torch.Tensor:
    """The combined delta of one module. `deltas` are float32 and are overwritten;
    None stands for an adapter without this module (dW = 0)."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter merge method {method!r}; use one of {', '.join(METHODS)}")
    present = [(i, d) for i, d in enumerate(deltas) if d is not None]
    if not present:
        raise ValueError(f"no adapter has module {module}")
    shape = present[0][1].shape
    if method in LINEAR_METHODS:
        out = torch.zeros(shape, dtype=torch.float32)
        for i, d in present:
            out.add_(d, alpha=weights[i])
        return out
    if density is None:
        raise ValueError(f"{method} needs a density")
    pruned = []
    for i, d in present:
        if method in ("ties", "magnitude_prune"):
            pruned.append((i, sparsify.magnitude(d, density)))
        else:
            pruned.append((i, sparsify.bernoulli(d, density, stream(seed, module, i), mode="inverse_density")))
    if method in ("magnitude_prune", "dare_linear"):
        out = torch.zeros(shape, dtype=torch.float32)
        for i, d in pruned:
            out.add_(d, alpha=weights[i])
        return out
    # sign election over the (unweighted) pruned deltas, then the disjoint mean of the weighted ones
    total = torch.zeros(shape, dtype=torch.float32)
    for _, d in pruned:
        total.add_(d)
    majority = torch.where(total >= 0, 1.0, -1.0)
    out = torch.zeros(shape, dtype=torch.float32)
    count = torch.zeros(shape, dtype=torch.float32)
    for i, d in pruned:
        agree = (torch.sign(d) == majority).to(torch.float32)
        out.add_(d * agree, alpha=weights[i])
        count.add_(agree)
    return out.div_(count.clamp_(min=1.0))


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, residual Frobenius norm, norm of delta) of the best rank-`rank` approximation B @ A."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    b = (u[:, :k] * s[:k]).to(torch.float32)
    a = vh[:k].to(torch.float32)
    if k < rank:  # pad to the declared rank with zeros so every module has rank `rank`
        b = torch.cat([b, torch.zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, torch.zeros(rank - k, a.shape[1])], dim=0)
    norm = float(s.pow(2).sum().sqrt())
    residual = float(s[k:].pow(2).sum().sqrt())
    return a, b, residual, norm
