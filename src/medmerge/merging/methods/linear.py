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
        if total != 1:  # x / 1 is x exactly (IEEE): weights that already sum to 1 skip a full pass
            result.div_(total)
    return result


# With normalize: true only the ratios of the weights matter, but they are applied as they are, in
# float32: below this magnitude a weight times a model value underflows (1e-45 is a subnormal float32,
# and 1e-45 / 2e-45 are not even in the ratio 1 : 2 there), so the result is not the weighted mean.
SMALLEST_WEIGHT = 1e-30


def _weights_check(g: dict, models: list) -> str | None:
    """With normalize, every non-zero weight and their sum must be large enough to compute with in float32."""
    if not g.get("normalize"):
        return None
    weights = [(ref, p["weight"]) for ref, p in models]
    for ref, w in weights:
        if w != 0 and abs(w) < SMALLEST_WEIGHT:
            return (f"linear: the weight {w:g} of model {ref} is too small to compute with in float32 (weights are "
                    f"applied as given, and below {SMALLEST_WEIGHT:g} their products with the model's values "
                    "underflow); with normalize: true only their ratios matter, so scale all weights up by the same "
                    "factor (e.g. 1 and 1 instead of 1e-45 and 1e-45)")
    total = sum(w for _, w in weights)
    if total != 0 and abs(total) < SMALLEST_WEIGHT:
        return (f"linear: the weights sum to {total:g}, which is too close to 0 to normalize by in float32 "
                "(they cancel); set `normalize: false` or change the weights")
    return None


METHOD = MergeMethod(
    MethodSpec(
        name="linear",
        params=(
            Param("weight", float, PER_INPUT, doc="weight w_i of each model"),
            Param("normalize", bool, default=True, doc="divide by the sum of weights"),
        ),
        base="ignored",
        elementwise=lambda g, m: True,
        check=_weights_check,
        formula="W = sum_i w_i W_i / (sum_i w_i if normalize else 1)",
        reference="https://arxiv.org/abs/2203.05482",
        memory="streamed by rows (each output row needs only the inputs' same row)",
    ),
    linear,
)
