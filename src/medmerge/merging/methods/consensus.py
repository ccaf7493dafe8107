"""Task-vector merges that weigh or count the models at each entry: SCE, RAM and RAM+ (tensor-local).

Definitions and defaults as mergekit 0.1.5. SCE and RAM+ use whole-tensor statistics (variances and top-k,
per-model mean squares; per-model counts), so they hold the N task vectors of a tensor; RAM is elementwise
and streams by rows.
"""

import torch

from .base import UNIT, Domain, MergeMethod, MethodSpec, Param, TensorInputs

NON_NEGATIVE = Domain(0.0, None)


def _task_vectors(x: TensorInputs) -> torch.Tensor:
    base = x.tensors[x.base]
    return torch.stack([x.tensors[i] - base for i in x.non_base], dim=0)


def sign_consensus(tvs: torch.Tensor) -> torch.Tensor:
    """TIES' elected sign (of the sum; ties go to +) and where each task vector agrees with it (zeros never)."""
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    return tvs.sign() == elected


def sce(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs = _task_vectors(x)
    k_share = p["select_topk"]
    if k_share < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * k_share) if k_share > 0 else 0
        mask = torch.zeros_like(var)
        if k > 0:
            _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
            mask.view(-1)[top] = 1
        tvs = tvs * mask.unsqueeze(0)
    agree = sign_consensus(tvs)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agree
    return base + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def _ram_parts(x: TensorInputs, epsilon: float):
    tvs = _task_vectors(x).view(len(x.non_base), -1)
    nonzero = tvs.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tvs, nonzero, counts, counts > 1, counts == 1


def ram(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs, nonzero, counts, overlap, unique = _ram_parts(x, p["epsilon"])
    z = tvs * nonzero
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    eps = p["epsilon"]
    tvs, nonzero, counts, overlap, unique = _ram_parts(x, eps)
    shared_n = (nonzero & overlap).sum(dim=1)
    unique_n = (nonzero & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=eps)
    lam = 1 + p["r"] * rho.clamp(min=0, max=p["alpha"])
    z = tvs * nonzero
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


SCE = MergeMethod(
    MethodSpec(
        name="sce",
        params=(
            Param("select_topk", float, default=1.0, domain=UNIT,
                  doc="share of entries kept: those whose task vectors vary most across the models"),
            Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no effect"),
        ),
        base="required",
        formula=(
            "tau_i = W_i - B; keep the top select_topk entries by Var_i(tau_i); m_i = [sign(tau_i) = "
            "sign(sum_i tau_i)]; c_i = mean(tau_i^2) / sum_j mean(tau_j^2); "
            "W = B + sum_i c_i m_i tau_i / max(sum_i c_i m_i, 1e-6)"
        ),
        reference="https://arxiv.org/abs/2408.07990",
        memory="whole tensor: the N task vectors, their variance and masks (about N + 3 copies)",
    ),
    sce,
)

_RAM_FORMULA = ("tau_i = W_i - B; n = #{i: |tau_i| > epsilon} per entry; W = B + sum_i tau_i [|tau_i| > epsilon] "
                "(1 where n = 1, 1/n where n > 1)")

RAM = MergeMethod(
    MethodSpec(
        name="ram",
        params=(Param("epsilon", float, default=1e-5, domain=NON_NEGATIVE,
                      doc="an entry of a task vector counts as changed above this magnitude"),),
        base="required",
        elementwise=lambda g, m: True,
        formula=_RAM_FORMULA,
        reference="https://arxiv.org/abs/2601.13572",
        memory="streamed by rows (each output row needs only the inputs' same row)",
    ),
    ram,
)

RAMPLUS_TL = MergeMethod(
    MethodSpec(
        name="ramplus_tl",
        params=(
            Param("r", float, default=0.1, domain=NON_NEGATIVE, doc="strength of the unique-entry rescaling"),
            Param("alpha", float, default=0.2, domain=NON_NEGATIVE, doc="cap of the shared/unique ratio rho"),
            Param("epsilon", float, default=1e-5, domain=NON_NEGATIVE,
                  doc="an entry of a task vector counts as changed above this magnitude"),
        ),
        base="required",
        formula=(_RAM_FORMULA + "; model i's unique entries scaled by 1 + r min(rho_i, alpha), "
                 "rho_i = (its shared entries) / (its unique entries) in this tensor"),
        reference="https://arxiv.org/abs/2601.13572",
        memory="whole tensor: the N task vectors and their masks (the ratios rho_i count over the whole tensor)",
    ),
    ramplus_tl,
)
