"""Model Stock: Jang et al., 2024 (https://arxiv.org/abs/2403.19522)."""

import torch

from .base import MergeMethod, MethodSpec, Param, TensorInputs


def model_stock(x: TensorInputs, p: dict) -> torch.Tensor:
    w_0 = x.tensors[x.base]
    ws = [x.tensors[i] for i in x.non_base]
    out_shape = w_0.shape
    if p["filter_wise"]:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    # No finite interpolation at the singularity: keep the base there.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos_theta / torch.where(singular, 1, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w_0).reshape(out_shape)


METHOD = MergeMethod(
    MethodSpec(
        name="model_stock",
        params=(Param("filter_wise", bool, default=False, doc="one ratio per row instead of per tensor"),),
        base="required",
        min_inputs=3,
        formula=(
            "cos = mean over pairs of cos(W_i - B, W_j - B); t = N cos / (1 + (N-1) cos) "
            "(0 where the denominator is ~0); W = t mean_i(W_i) + (1-t) B"
        ),
        reference="https://arxiv.org/abs/2403.19522",
        memory="whole tensor: the N inputs plus their N offsets from the base and about three more copies",
    ),
    model_stock,
)
