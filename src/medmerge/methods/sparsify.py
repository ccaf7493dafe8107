"""Sparsification of task vectors (TIES trim, DARE drop, Breadcrumbs, DELLA).

`rescale_mode` chooses how surviving entries are rescaled when rescaling is on:
"l1" matches the L1 norm of the dense vector (mergekit 0.1.5), and
"inverse_density" divides each kept entry by its keep probability (the DARE and
DELLA papers).

These functions overwrite the task vector they are given (the caller owns it):
on a large embedding every avoided copy is a gigabyte.
"""

from typing import Optional

import torch

from .base import stable_sum


def _abs_sum(tensor: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        total += stable_sum(flat[start : start + chunk].abs())
    return total


def _rescale(
    tensor: torch.Tensor, keep: torch.Tensor, mode: Optional[str], keep_prob=None, eps: float = 1e-7
) -> torch.Tensor:
    """Zero the entries where `keep` (bool) is False, then rescale, in place."""
    before = _abs_sum(tensor) if mode == "l1" else None
    tensor.masked_fill_(~keep, 0)
    if mode is None:
        return tensor
    if mode == "inverse_density":
        return tensor.div_(keep_prob)
    # stable sums: the ratio must not depend on how torch splits a sum across threads
    after = _abs_sum(tensor)
    if before < eps or after < eps:
        return tensor
    return tensor.mul_((before / after).to(tensor.dtype))


def rank_range_mask(magnitudes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Boolean mask of the entries whose ascending rank is in [lo, hi).

    Ranks order equal values by position (a stable sort), so the mask has exactly
    hi - lo entries and is deterministic. Uses two selections (kthvalue, O(n))
    instead of a full sort, which is several times faster on large tensors.
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if hi <= lo:
        return mask.reshape(magnitudes.shape)
    mask[:] = True
    if lo > 0:
        value = torch.kthvalue(flat, lo + 1).values
        below = flat < value
        mask &= ~below
        drop = lo - int(below.sum())  # equal values ranked before `lo`: the first ones
        if drop > 0:
            mask[(flat == value).nonzero().flatten()[:drop]] = False
    if hi < n:
        value = torch.kthvalue(flat, hi).values
        above = flat > value
        mask &= ~above
        drop = n - int(above.sum()) - hi  # equal values ranked at or after `hi`: the last ones
        if drop > 0:
            mask[(flat == value).nonzero().flatten()[-drop:]] = False
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


def bernoulli(
    tensor: torch.Tensor, density: float, generator: torch.Generator, mode: Optional[str] = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return tensor
    # Draw on the CPU from a per-tensor generator so the mask is the same on any device.
    keep = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) < density
    return _rescale(tensor, keep.to(tensor.device), mode, keep_prob=density)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
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
    draws = torch.rand(probs.shape, generator=generator, dtype=torch.float32).to(probs.device)
    return _rescale(rows, draws < probs, mode, keep_prob=probs).reshape(shape)
