"""Selection by magnitude rank (TIES trim, Breadcrumbs) without a full sort."""

import torch

from medmerge.merging.methods.sparsify import magnitude, rank_range_mask


def test_rank_range_mask_equals_a_stable_sort_even_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 60, (1,), generator=g))
        x = torch.randint(0, 5, (n,), generator=g).float()  # many equal values
        lo = int(torch.randint(0, n + 1, (1,), generator=g))
        hi = int(torch.randint(lo, n + 1, (1,), generator=g))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.sort(x, stable=True).indices[lo:hi]] = True
        assert torch.equal(rank_range_mask(x, lo, hi), expected), (x, lo, hi)


def test_magnitude_keeps_exactly_k_with_ties():
    x = torch.tensor([1.0, -1.0, 1.0, 0.5, -2.0, 1.0])
    kept = magnitude(x, density=0.5)  # k = 3 of |x| = 1,1,1,.5,2,1: 2 and the last two 1s
    assert torch.equal(kept, torch.tensor([0.0, 0.0, 1.0, 0.0, -2.0, 1.0]))


def test_kth_smallest_and_rank_mask_on_large_tensors_with_ties():
    from medmerge.merging.methods.sparsify import kth_smallest

    g = torch.Generator().manual_seed(1)
    # bfloat16-valued data: a million entries over a few thousand distinct values
    x = torch.randn(1_000_003, generator=g).bfloat16().float().abs()
    order = torch.sort(x, stable=True)
    for k in (1, 17, 500_000, 999_999, 1_000_003):
        assert kth_smallest(x, k) == order.values[k - 1]
    for lo, hi in ((0, 400_000), (600_000, 1_000_003), (123_456, 876_543)):
        expected = torch.zeros_like(x, dtype=torch.bool)
        expected[order.indices[lo:hi]] = True
        assert torch.equal(rank_range_mask(x, lo, hi), expected)
