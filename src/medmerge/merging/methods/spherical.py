"""Means on the hypersphere of N models: Multi-SLERP and the Karcher mean (mergekit 0.1.5's definitions).

Both treat each tensor as one flattened vector, so both hold the N inputs and a few float32 vectors of the
tensor's size (not streamed by rows: the norms and the mean direction are whole-tensor quantities).
"""

import torch

from .base import PER_NON_BASE, Domain, MergeMethod, MethodSpec, Param, TensorInputs, weights_of

POSITIVE = Domain(0.0, None, low_open=True)


def multislerp(x: TensorInputs, p: dict) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: the weighted mean direction's tangent space, then exp map."""
    idx = x.non_base
    if len(idx) == 1:
        return x.tensors[idx[0]].clone()
    base = x.tensors[x.base] if x.base is not None else None
    tensors = torch.stack([x.tensors[i] for i in idx], dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = weights_of(x, idx)
    if p["normalize_weights"]:
        w = w / w.sum()
    eps = p["eps"]
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(idx) == 2:  # two antipodal directions: the linear interpolation
            out = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
            return out + base if base is not None else out
        raise ValueError(f"multislerp: the weighted mean of the unit directions of {x.name} is zero (antipodal "
                         "inputs whose weights balance out); change the weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return out + base if base is not None else out


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the directions, scaled by the weighted mean norm."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for alpha, unit in zip(a, u):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * n for alpha, n in zip(alphas, norms)) * mean


def karcher(x: TensorInputs, p: dict) -> torch.Tensor:
    tensors = x.tensors
    if len(tensors) == 1:
        return tensors[0].clone()
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), p["max_iter"], p["tol"])


MULTISLERP = MergeMethod(
    MethodSpec(
        name="multislerp",
        params=(
            Param("weight", float, PER_NON_BASE, doc="weight w_i of each model (its share of the mean)"),
            Param("normalize_weights", bool, default=True, doc="divide the weights by their sum"),
            Param("eps", float, default=1e-8, domain=POSITIVE, doc="numerical floor of the norms"),
        ),
        base="optional",
        min_non_base=1,
        formula=(
            "v_i = W_i - B (B = 0 without base), flattened; u_i = v_i/|v_i|; m = sum w_i u_i / |.|; "
            "t = sum w_i (u_i - <u_i,m> m); W = B + (cos|t| m + sin|t| t/|t|) sum_i w_i |v_i|"
        ),
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        memory="whole tensor: the N inputs, their stacked copy and about three float32 vectors of the tensor's size",
    ),
    multislerp,
)

KARCHER = MergeMethod(
    MethodSpec(
        name="karcher",
        params=(
            Param("max_iter", int, default=10, domain=Domain(1.0, None), doc="Riemannian gradient steps at most"),
            Param("tol", float, default=1e-5, domain=POSITIVE, doc="stop when the tangent step is below this"),
        ),
        base="ignored",
        formula=(
            "u_i = W_i/|W_i| (flattened); m = argmin_m sum_i d(m, u_i)^2 on the sphere, by m <- exp_m(sum_i "
            "a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m)), a_i = 1/N; W = (sum_i a_i |W_i|) m"
        ),
        reference="https://arxiv.org/abs/2603.04972",
        memory="whole tensor: the N inputs, N unit copies and about three vectors of the tensor's size",
    ),
    karcher,
)
