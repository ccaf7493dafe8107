"""Spherical linear interpolation between the base and one other model.

Each tensor is treated as one flattened vector (as mergekit 0.1.5 does).
"""

import torch

from .base import MergeMethod, MethodSpec, Param, TensorInputs

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    # Reductions accumulate in float64, so the angle does not depend on the thread count.
    norm_a = torch.sum(a * a, dtype=torch.float64).sqrt()
    norm_b = torch.sum(b * b, dtype=torch.float64).sqrt()
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    dot = (torch.sum(a * b, dtype=torch.float64) / (norm_a * norm_b)).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        # (anti)collinear: the sphere arc is degenerate, fall back to lerp
        return ((1 - t) * v0 + t * v1).reshape(v0.shape)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_a = float(torch.sin((1 - t) * theta) / sin_theta)
    coef_b = float(torch.sin(t * theta) / sin_theta)
    return (coef_a * v0 + coef_b * v1).reshape(v0.shape)


def slerp(x: TensorInputs, p: dict) -> torch.Tensor:
    other = x.non_base[0]
    return slerp_vectors(p["t"], x.tensors[x.base], x.tensors[other])


METHOD = MergeMethod(
    MethodSpec(
        name="slerp",
        params=(Param("t", float, doc="0 gives the base model, 1 the other model"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        formula=(
            "theta = arccos(<v0/|v0|, v1/|v1|>); W = sin((1-t) theta)/sin(theta) v0 + "
            "sin(t theta)/sin(theta) v1, v0 = base, v1 = other, each tensor flattened; "
            "lerp (1-t) v0 + t v1 when |cos theta| > 0.9995"
        ),
        reference="https://en.wikipedia.org/wiki/Slerp",
    ),
    slerp,
)
