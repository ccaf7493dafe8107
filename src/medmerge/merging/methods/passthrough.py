"""Passthrough: copy the single input, optionally scaled."""

import torch

from .base import PER_INPUT, MergeMethod, MethodSpec, Param, TensorInputs


def passthrough(x: TensorInputs, p: dict) -> torch.Tensor:
    scale = x.model_params[0]["scale"]
    return x.tensors[0] if scale is None else x.tensors[0] * scale



METHOD = MergeMethod(
    MethodSpec(
        name="passthrough",
        params=(Param("scale", float, PER_INPUT, default=None, doc="multiply the tensor (default: copy)"),),
        base="ignored",
        max_inputs=1,
        elementwise=lambda g, m: True,
        formula="W = scale * W_1 (W_1 when scale is unset)",
        memory="streamed by rows (each output row needs only the inputs' same row)",
    ),
    passthrough,
)
