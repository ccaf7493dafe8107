"""Linear (weighted average) merge: Wortsman et al., Model Soups, 2022."""

import torch

from .base import PER_INPUT, MergeMethod, MethodSpec, Param, TensorInputs, weights_of


def linear(x: TensorInputs, p: dict) -> torch.Tensor:
    idx = list(range(len(x.tensors)))
    w = weights_of(x, idx)  # in the working dtype, as the coefficients are applied
    first = x.tensors[0]
    # 0 + w*t rounds like w*t, so starting from the first term matches mergekit's
    # zeros().addcmul_() bit for bit while saving a pass (and in place when allowed).
    result = first.mul_(w[0]) if x.owned else first * w[0]
    for tensor, coefficient in zip(x.tensors[1:], w[1:]):
        result.add_(tensor, alpha=float(coefficient))
    if p["normalize"]:
        total = w.sum()
        if total == 0:
            raise ValueError(
                f"linear: the weights of {x.name} sum to 0, so they cannot be normalized; "
                "set `normalize: false` or change the weights"
            )
        result.div_(total)
    return result


METHOD = MergeMethod(
    MethodSpec(
        name="linear",
        params=(
            Param("weight", float, PER_INPUT, doc="weight w_i of each model"),
            Param("normalize", bool, default=True, doc="divide by the sum of weights"),
        ),
        base="ignored",
        elementwise=lambda g, m: True,
        formula="W = sum_i w_i W_i / (sum_i w_i if normalize else 1)",
        reference="https://arxiv.org/abs/2203.05482",
    ),
    linear,
)
