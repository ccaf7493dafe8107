"""NuSLERP: SLERP of two models (or of their task vectors when a base is given),
with the interpolation factor derived from per-model weights."""

import torch

from .base import PER_NON_BASE, MergeMethod, MethodSpec, Param, TensorInputs


def interpolation_factor(w0: float, w1: float) -> float:
    """t = w_2 / (w_1 + w_2), 0.5 when the weights sum to (about) 0."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp_vectors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(v):
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(x: TensorInputs, p: dict) -> torch.Tensor:
    first, second = x.non_base
    t = interpolation_factor(x.model_params[first]["weight"], x.model_params[second]["weight"])
    dim = 0 if p["nuslerp_row_wise"] else -1
    v0, v1 = x.tensors[first], x.tensors[second]
    if x.base is None:
        return nuslerp_vectors(t, v0, v1, dim=dim, flatten=p["nuslerp_flatten"])
    base = x.tensors[x.base]
    return base + nuslerp_vectors(t, v0 - base, v1 - base, dim=dim, flatten=p["nuslerp_flatten"])


def check(g: dict, models: list) -> str | None:
    """t derived from the weights must lie in [0, 1] unless `allow_extrapolation`."""
    weighted = [(ref, p["weight"]) for ref, p in models if "weight" in p]
    if g["allow_extrapolation"] or len(weighted) != 2:
        return None
    (r0, w0), (r1, w1) = weighted
    t = interpolation_factor(w0, w1)
    if 0 <= t <= 1:
        return None
    return (f"nuslerp: t = w_2 / (w_1 + w_2) = {t:g} (weight {w0:g} for {r0}, {w1:g} for {r1}) is outside [0, 1], "
            "which extrapolates beyond the two models; give both weights one sign, or set "
            "`allow_extrapolation: true`")


METHOD = MergeMethod(
    MethodSpec(
        name="nuslerp",
        params=(
            Param("weight", float, PER_NON_BASE, doc="relative weight; t = w_2 / (w_1 + w_2)"),
            Param("nuslerp_row_wise", bool, default=False, doc="SLERP each column vector (dim 0)"),
            Param("nuslerp_flatten", bool, default=True, doc="SLERP the whole flattened tensor"),
            Param("allow_extrapolation", bool, default=False, doc="allow weights whose t falls outside [0, 1]"),
        ),
        base="optional",
        min_non_base=2,
        max_non_base=2,
        formula=(
            "t = w_2/(w_1+w_2) (0.5 if the sum is 0); without base W = slerp(t, W_1, W_2); "
            "with base B: W = B + slerp(t, W_1 - B, W_2 - B); vectors are the flattened tensor "
            "(default), rows (last dim) or columns (nuslerp_row_wise)"
        ),
        reference="https://github.com/arcee-ai/mergekit",
        memory="whole tensor: the two inputs (and the base) plus about two float32 copies",
        check=check,
    ),
    nuslerp,
)
