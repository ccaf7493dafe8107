"""Merges that take the other model's value only where it is close to, or matters more than, the base's:
NearSwap and Arcee Fusion (mergekit 0.1.5's definitions and defaults)."""

import torch
import torch.nn.functional as F

from .base import Domain, MergeMethod, MethodSpec, Param, TensorInputs

QUANTILE_SAMPLE = 1_000_000  # above this many entries the quartiles come from a seeded sample (as mergekit's)


def nearswap(x: TensorInputs, p: dict) -> torch.Tensor:
    a, b = x.tensors[x.base], x.tensors[x.non_base[0]]
    weight = (p["t"] / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def _quantiles(values: torch.Tensor, q: torch.Tensor, x: TensorInputs) -> torch.Tensor:
    """mergekit's approximate quantiles: sorted values at floor(q (n - 1)); a sample of 1e6 (with replacement)
    for larger tensors, drawn from this tensor's seeded stream (mergekit draws from torch's global RNG)."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        g = torch.Generator(device="cpu").manual_seed(x.stream_seed("arcee_fusion quantiles"))
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=g).to(flat.device)]
    ordered, _ = torch.sort(flat)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def arcee_fusion(x: TensorInputs, p: dict) -> torch.Tensor:
    base, other = x.tensors[x.base], x.tensors[x.non_base[0]]
    diff = (other - base).abs()
    eps = 1e-8
    pr = F.softmax(other, dim=-1) + eps
    qr = F.softmax(base, dim=-1) + eps
    importance = diff * torch.sum(pr * torch.log(pr / qr), dim=-1, keepdim=True)
    q1, median, q3 = _quantiles(importance, torch.tensor([0.25, 0.5, 0.75]), x)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


NEARSWAP = MergeMethod(
    MethodSpec(
        name="nearswap",
        params=(Param("t", float, domain=Domain(0.0, None),
                      doc="distance below which the other model's value is taken whole"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        elementwise=lambda g, m: True,
        formula="w = clamp(t / max(|B - W_1|, 1e-6), 0, 1) per entry; W = w W_1 + (1 - w) B",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        memory="streamed by rows (each output row needs only the inputs' same row)",
    ),
    nearswap,
)

ARCEE_FUSION = MergeMethod(
    MethodSpec(
        name="arcee_fusion",
        params=(),
        base="required",
        min_inputs=2,
        max_inputs=2,
        random=True,  # only for tensors above 1e6 entries (the quartiles' sample)
        formula=(
            "I = |W_1 - B| KL(softmax(W_1) || softmax(B)) (per row, last dim); tau = median(I) + 1.5 IQR(I) "
            "(quartiles of a seeded 1e6 sample above 1e6 entries); W = B + (W_1 - B) [I >= tau]"
        ),
        reference="https://arcee.ai",
        memory="whole tensor: the two inputs, two row softmaxes, the importance and a sorted copy (about 6 copies)",
    ),
    arcee_fusion,
)
