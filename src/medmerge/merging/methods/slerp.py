"""Spherical linear interpolation between the base and one other model.

Each tensor is treated as one flattened vector (as mergekit 0.1.5 does).
"""

import torch

from .base import UNIT, MergeMethod, MethodSpec, Param, TensorInputs, chunked_sum

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SLERP of two tensors as flattened vectors; `inplace` may overwrite v0."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    # chunked float64-accumulated sums: no full-size temporaries, thread-independent
    norm_a = chunked_sum(torch.mul, a, a).sqrt()
    norm_b = chunked_sum(torch.mul, b, b).sqrt()
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    dot = (chunked_sum(torch.mul, a, b) / (norm_a * norm_b)).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        # (anti)collinear: the sphere arc is degenerate, fall back to lerp
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = float(torch.sin((1 - t) * theta) / sin_theta)
        coef_b = float(torch.sin(t * theta) / sin_theta)
    out = v0.mul_(coef_a) if inplace else v0 * coef_a
    return out.add_(v1, alpha=coef_b)


def slerp(x: TensorInputs, p: dict) -> torch.Tensor:
    other = x.non_base[0]
    return slerp_vectors(p["t"], x.tensors[x.base], x.tensors[other], inplace=x.owned)


METHOD = MergeMethod(
    MethodSpec(
        name="slerp",
        params=(
            Param("t", float, domain=UNIT, unless="allow_extrapolation",
                  doc="0 gives the base model, 1 the other model"),
            Param("allow_extrapolation", bool, default=False,
                  doc="allow t outside [0, 1] (beyond the two models on their great circle)"),
        ),
        base="required",
        min_inputs=2,
        max_inputs=2,
        formula=(
            "theta = arccos(<v0/|v0|, v1/|v1|>); W = sin((1-t) theta)/sin(theta) v0 + "
            "sin(t theta)/sin(theta) v1, v0 = base, v1 = other, each tensor flattened; "
            "lerp (1-t) v0 + t v1 when |cos theta| > 0.9995"
        ),
        reference="https://en.wikipedia.org/wiki/Slerp",
        memory=("whole tensor: the two inputs; norms and the dot product are summed chunk by chunk, no full-size "
                "temporary"),
    ),
    slerp,
)
