"""Merges weighted by calibration statistics (`medmerge stats`): RegMean and Fisher merging.

Each input model names its statistics folder with the per-model parameter `stats`. The plan checks every
folder before a tensor is read (computed on that very model, the statistics of each tensor present with the
right shape); the executor reads one tensor's statistics per model beside the tensor itself
(`TensorInputs.stats`), so memory stays within a few tensors plus their statistics. Tensors without
statistics in any input (RegMean: everything but the weights of linear layers: embeddings, norms, biases, a
tied head) are averaged with the same weights.
"""

import torch

from .base import PER_INPUT, UNIT, Domain, MergeMethod, MethodSpec, Param, TensorInputs, weights_of

NON_NEGATIVE = Domain(0.0, None)
POSITIVE = Domain(0.0, None, low_open=True)


def _weighted_average(x: TensorInputs, w: torch.Tensor) -> torch.Tensor:
    result = x.tensors[0] * w[0]
    for tensor, coefficient in zip(x.tensors[1:], w[1:]):
        result.add_(tensor, alpha=float(coefficient))
    return result / w.sum()


def _weights(x: TensorInputs) -> torch.Tensor:
    w = weights_of(x, list(range(len(x.tensors))))
    if float(w.sum()) <= 0:
        raise ValueError("the weights sum to 0; give at least one model a positive weight")
    return w


def regmean(x: TensorInputs, p: dict) -> torch.Tensor:
    w = _weights(x)
    if x.stats is None:
        return _weighted_average(x, w)
    # float64: gram matrices of real activations are ill-conditioned (outlier features), and a float32 solve
    # loses digits there (a model merged with itself came back 1e-4 off)
    dtype = torch.float64
    alpha = p["reduce_non_diagonal_ratio"]
    total, rhs = None, None
    for weight, tensor, gram, wi in zip(x.tensors, x.tensors, x.stats, w.tolist()):
        g = gram.to(dtype, copy=True)  # statistics are never overwritten
        if alpha != 1.0:  # G~ = alpha G + (1 - alpha) diag(G): off-diagonal entries scaled by alpha
            diag = torch.diagonal(g).clone()
            g.mul_(alpha)
            torch.diagonal(g).copy_(diag)
        g.mul_(wi)
        part = g @ tensor.to(dtype).T  # [in, out]
        total = g if total is None else total.add_(g)
        rhs = part if rhs is None else rhs.add_(part)
    try:
        solved = torch.linalg.solve(total, rhs)
    except RuntimeError:  # singular: inputs that never vary; the least-norm solution of the same system
        solved = torch.linalg.lstsq(total, rhs).solution if total.device.type == "cpu" else \
            torch.linalg.pinv(total) @ rhs
    return solved.T.to(x.tensors[0].dtype).contiguous()


def fisher(x: TensorInputs, p: dict) -> torch.Tensor:
    w = _weights(x)
    if x.stats is None:
        return _weighted_average(x, w)
    floor = p["fisher_floor"]
    w = w.tolist()
    if p["normalize"]:  # each model's Fisher scaled by 1 / its norm over the whole model (from the record)
        inverse = [1.0 / (mp["fisher_norm"] + floor) for mp in x.model_params]
        w = [wi * v / sum(inverse) for wi, v in zip(w, inverse)]
    num, den = None, None
    for tensor, f, wi in zip(x.tensors, x.stats, w):
        coef = f.to(tensor.dtype, copy=True).add_(floor).mul_(wi)
        term = coef * tensor
        num = term if num is None else num.add_(term)
        den = coef if den is None else den.add_(coef)
    return num.div_(den)


_WEIGHT = Param("weight", float, PER_INPUT, default=1.0, domain=NON_NEGATIVE,
                doc="weight lambda_i of each model (scales its statistics); at least one positive")
_STATS = Param("stats", str, PER_INPUT, doc="the model's statistics folder (`medmerge stats`)")

REGMEAN = MergeMethod(
    MethodSpec(
        name="regmean",
        params=(
            _WEIGHT,
            _STATS,
            Param("reduce_non_diagonal_ratio", float, default=1.0, domain=UNIT,
                  doc="alpha: off-diagonal entries of each gram matrix scaled by alpha (1: exact RegMean)"),
        ),
        base="ignored",
        stats="gram",
        formula="linear weights: W = (sum_i lambda_i W_i G~_i) (sum_i lambda_i G~_i)^-1, G_i = X_i^T X_i / n_i, "
                "G~_i = alpha G_i + (1 - alpha) diag(G_i); other tensors: sum_i lambda_i W_i / sum_i lambda_i",
        reference="https://arxiv.org/abs/2212.09849",
        memory="whole tensor plus each model's [in, in] gram matrix, their sum and the solve (float64)",
    ),
    regmean,
)

FISHER = MergeMethod(
    MethodSpec(
        name="fisher",
        params=(
            _WEIGHT,
            _STATS,
            Param("fisher_floor", float, default=1e-6, domain=POSITIVE,
                  doc="epsilon added to every Fisher value (entries no model is sensitive to are averaged)"),
            Param("normalize", bool, default=True, doc="scale each model's Fisher by 1 / (its norm over the "
                  "whole model + epsilon), so no model dominates by scale (FusionBench's normalize_fisher_weight)"),
        ),
        base="ignored",
        stats="fisher",
        formula="W = sum_i c_i (F_i + eps) W_i / sum_i c_i (F_i + eps), F_i the diagonal Fisher, c_i = lambda_i "
                "(normalize: lambda_i / (||F_i|| + eps), ||F_i|| over the whole model)",
        reference="https://arxiv.org/abs/2111.09832",
        memory="whole tensor plus each model's Fisher tensor (same shape)",
    ),
    fisher,
)
