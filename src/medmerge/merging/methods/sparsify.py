"""Sparsification of task vectors (TIES trim, DARE drop, Breadcrumbs, DELLA).

`rescale_mode` chooses how surviving entries are rescaled when rescaling is on:
"l1" matches the L1 norm of the dense vector (mergekit 0.1.5), and
"inverse_density" divides each kept entry by its keep probability (the DARE and
DELLA papers).

These functions overwrite the task vector they are given (the caller owns it):
on a large embedding every avoided copy is a gigabyte.
"""

import math
from typing import Optional

import numpy as np
import torch

from .base import chunked_sum


def _abs_sum(tensor: torch.Tensor) -> torch.Tensor:
    return chunked_sum(torch.abs, tensor)


def _rescale(
    tensor: torch.Tensor, keep: torch.Tensor, mode: Optional[str], keep_prob=None
) -> torch.Tensor:
    """Zero the entries where `keep` (bool, or float 0/1) is 0, then rescale, in place."""
    before = _abs_sum(tensor) if mode == "l1" else None
    tensor.mul_(keep)
    return _finish_rescale(tensor, before, mode, keep_prob)


def _finish_rescale(tensor: torch.Tensor, before, mode: Optional[str], keep_prob, eps: float = 1e-7) -> torch.Tensor:
    if mode is None:
        return tensor
    if mode == "inverse_density":
        return tensor.div_(keep_prob)
    # stable sums: the ratio must not depend on how torch splits a sum across threads
    after = _abs_sum(tensor)
    if before < eps or after < eps:
        return tensor
    return tensor.mul_((before / after).to(tensor.dtype))


class UniformStream:
    """Uniform [0, 1) float32 draws from PCG64 seeded with an integer.

    Successive draws continue one stream, so drawing in chunks gives the same
    numbers as one large draw: masks are reproducible on any platform, thread
    count or device (draws happen on the CPU), and about twice as fast as torch's
    Mersenne Twister.
    """

    def __init__(self, seed: int):
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def draw(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self._rng.random(n, dtype=np.float32))


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, exactly.

    A sorted strided sample brackets the answer; one counting pass and one
    extraction of the few values inside the bracket replace a selection over the
    whole tensor (about 3x faster than torch.kthvalue on large tensors). If the
    bracket misses, the full selection runs, so the result is always exact.
    """
    n = flat.numel()
    if n <= (1 << 18):
        return torch.kthvalue(flat, k).values
    sample = flat[:: max(1, n >> 16)].sort().values
    m = sample.numel()
    target = (k - 0.5) / n * m
    margin = 6 * math.sqrt(m) + 8
    lo_i, hi_i = int(target - margin), int(target + margin)
    low = sample[lo_i] if lo_i > 0 else None
    high = sample[hi_i] if hi_i < m - 1 else None
    if low is None and high is None:
        return torch.kthvalue(flat, k).values
    below = int(torch.count_nonzero(flat < low)) if low is not None else 0
    if low is None:
        inside = flat <= high
    elif high is None:
        inside = flat >= low
    else:
        inside = (flat >= low) & (flat <= high)
    candidates = flat[inside]
    if below < k <= below + candidates.numel():
        return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(flat, k).values


def _drop_ties(mask: torch.Tensor, equal: torch.Tensor, count: int, from_start: bool, chunk: int = 1 << 20) -> None:
    """Clear `mask` at the first (or last) `count` positions where `equal` is True.

    Counts per chunk locate the chunk where the count is reached and a cumulative
    sum inside it the exact position; then one boolean pass clears the prefix (or
    suffix) up to it. No index lists over the whole tensor.
    """
    if count <= 0:
        return
    n = equal.numel()
    seen = 0
    starts = range(0, n, chunk) if from_start else reversed(range(0, n, chunk))
    for start in starts:
        part = equal[start : start + chunk]
        found = int(torch.count_nonzero(part))
        if seen + found >= count:
            need = count - seen
            if from_start:
                within = torch.cumsum(part.to(torch.int32), 0)
                stop = start + int(torch.searchsorted(within, need)) + 1
                mask[:stop].logical_and_(~equal[:stop])
            else:
                within = torch.cumsum(part.flip(0).to(torch.int32), 0)
                begin = start + part.numel() - (int(torch.searchsorted(within, need)) + 1)
                mask[begin:].logical_and_(~equal[begin:])
            return
        seen += found
    raise AssertionError("fewer ties than the count to drop")


def rank_range_mask(magnitudes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Boolean mask of the entries whose ascending rank is in [lo, hi).

    Ranks order equal values by position (a stable sort), so the mask has exactly
    hi - lo entries and is deterministic. Uses selections (`kth_smallest`), not a
    full sort, which is several times faster on large tensors.
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if hi <= lo:
        return torch.zeros(magnitudes.shape, dtype=torch.bool, device=flat.device)
    mask = None
    if lo > 0:
        value = kth_smallest(flat, lo + 1)
        mask = flat >= value
        # values equal to `value` ranked before `lo` (the first ones) are out
        _drop_ties(mask, flat == value, lo - (n - int(torch.count_nonzero(mask))), from_start=True)
    if hi < n:
        value = kth_smallest(flat, hi)
        upper = flat <= value
        # values equal to `value` ranked at or after `hi` (the last ones) are out
        _drop_ties(upper, flat == value, int(torch.count_nonzero(upper)) - hi, from_start=False)
        mask = upper if mask is None else mask & upper
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    return mask.reshape(magnitudes.shape)


def magnitude(tensor: torch.Tensor, density: float, mode: Optional[str] = None) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (at least one)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    n = tensor.numel()
    k = max(1, int(density * n))
    return _rescale(tensor, rank_range_mask(tensor.abs(), n - k, n), mode, keep_prob=density)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, mode: Optional[str] = None
) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` largest entries, then the smallest, keeping `density`."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    keep = rank_range_mask(tensor.abs(), n_bottom, min(n, n_bottom + target))
    return _rescale(tensor, keep, mode, keep_prob=density)


def _keep_where_below(uniform: torch.Tensor, prob) -> torch.Tensor:
    """Float 0/1 mask of uniform < prob, computed in place as ceil(prob - u).

    With u in [0, 1) and prob in (0, 1], prob - u lies in (-1, 1] and is exact near
    0 (Sterbenz), so its ceiling is 1 exactly when u < prob. Float masks multiply
    several times faster than boolean ones on the CPU.
    """
    return uniform.neg_().add_(prob).ceil_()


def bernoulli(
    tensor: torch.Tensor, density: float, stream: UniformStream, mode: Optional[str] = None, chunk: int = 1 << 22
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density` (in place, chunked)."""
    if density >= 1:
        return tensor
    before = _abs_sum(tensor) if mode == "l1" else None
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        part.mul_(_keep_where_below(stream.draw(part.numel()), density).to(part.device))
    return _finish_rescale(tensor, before, mode, density)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    stream: UniformStream,
    mode: Optional[str] = None,
    where: str = "",
) -> torch.Tensor:
    """DELLA MagPrune: keep probability grows linearly with the magnitude rank in each row,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della{where}: density +/- epsilon must lie in (0, 1); got density={density}, "
            f"epsilon={epsilon}. Lower epsilon or move density toward 0.5"
        )
    shape = tensor.shape
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    draws = stream.draw(probs.numel()).reshape(probs.shape).to(probs.device)
    return _rescale(rows, _keep_where_below(draws, probs), mode, keep_prob=probs).reshape(shape)
