"""One MedCare linear layer: a frozen W0 plus low-rank paths, in PEFT's orientation (delta = s * B @ A).

    y = W0 x + s * B A x                                    shared path: attention LoRA, or the FFN
                                                            knowledge aggregator (KA)
          + sum over the top-k routed experts p_i * s * B_i A_i x     stage 1 FFN: the noise aggregator
          + s * B_AM A_AM x                                  stage 2 FFN: the alignment module

The layer subclasses `nn.Linear` and keeps W0 as its own `weight` (and `bias`), so
a model's state-dict keys for the base weights do not change and a model with
these layers still saves, loads and generates as the transformers model it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's / nn.Linear's A init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


class MedCareLinear(nn.Linear):
    """A linear layer with a shared low-rank path, optional routed noise experts and an optional alignment module.

    `shared` names the shared path's parameters: "lora" (attention) or "ka" (knowledge aggregator).
    Adapter parameters are float32 whatever W0's dtype; inputs are cast to them and the sum back to W0's.
    """

    def __init__(self, base: nn.Linear, *, shared: str, rank: int, scaling: float, dropout: float,
                 generator: torch.Generator):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta", dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.shared = shared
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.register_parameter(f"{shared}_A", nn.Parameter(
            _kaiming((rank, self.in_features), self.in_features, generator).to(device)))
        self.register_parameter(f"{shared}_B", nn.Parameter(torch.zeros(self.out_features, rank, device=device)))
        self.router: Optional[nn.Linear] = None
        self.noise_A: Optional[nn.Parameter] = None
        self.noise_B: Optional[nn.Parameter] = None
        self.top_k = 0
        self.am_A: Optional[nn.Parameter] = None
        self.am_B: Optional[nn.Parameter] = None
        self.last_penalty: Optional[torch.Tensor] = None

    # --- the parts ---------------------------------------------------------------------------------------

    @property
    def A(self) -> nn.Parameter:
        return getattr(self, f"{self.shared}_A")

    @property
    def B(self) -> nn.Parameter:
        return getattr(self, f"{self.shared}_B")

    def add_noise_experts(self, experts: int, rank: int, top_k: int, generator: torch.Generator) -> None:
        """The noise aggregator: `experts` LoRA experts of rank `rank` and a router (linear with bias + softmax)."""
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({experts})")
        device = self.weight.device
        router = nn.Linear(self.in_features, experts, bias=True, device=device, dtype=torch.float32)
        with torch.no_grad():  # nn.Linear's own init, drawn from the recorded generator
            router.weight.copy_(_kaiming((experts, self.in_features), self.in_features, generator))
            router.bias.copy_(_kaiming((experts,), self.in_features, generator))
        self.router = router
        self.noise_A = nn.Parameter(_kaiming((experts, rank, self.in_features), self.in_features, generator).to(device))
        self.noise_B = nn.Parameter(torch.zeros(self.out_features, experts, rank, device=device))
        self.top_k = top_k

    def drop_noise_experts(self) -> None:
        self.router = None
        self.noise_A = None
        self.noise_B = None
        self.top_k = 0

    def add_alignment_module(self, rank: int, generator: torch.Generator) -> None:
        """The alignment module: A random (PEFT's init), B zero, so it starts as the identity."""
        device = self.weight.device
        self.am_A = nn.Parameter(_kaiming((rank, self.in_features), self.in_features, generator).to(device))
        self.am_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    # --- computation -------------------------------------------------------------------------------------

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights (..., experts): softmax of the router, the top k kept and renormalised to sum 1."""
        probs = torch.softmax(self.router(x.to(self.router.weight.dtype)), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, top_i, top_p)

    def orthogonality_penalty(self) -> torch.Tensor:
        """|A_KA @ A_AM^T|_1, entry-wise: zero when the two row spaces are orthogonal."""
        return (self.A @ self.am_A.T).abs().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        xa = self.dropout(x.to(self.A.dtype))
        update = self.scaling * F.linear(F.linear(xa, self.A), self.B)
        if self.router is not None:
            experts, rank = self.noise_A.shape[:2]
            gates = self.gates(x)
            # all experts densely in two matmuls (the cost of one rank experts*rank LoRA), gated per token:
            # exactly sum over the top-k of p_i B_i A_i x, since the other gates are zero
            h = F.linear(xa, self.noise_A.reshape(experts * rank, self.in_features))
            h = (h.unflatten(-1, (experts, rank)) * gates.unsqueeze(-1)).flatten(-2)
            update = update + self.scaling * F.linear(h, self.noise_B.reshape(self.out_features, experts * rank))
        if self.am_A is not None:
            update = update + self.scaling * F.linear(F.linear(xa, self.am_A), self.am_B)
            # computed here, inside the forward, where sharded parameters (ZeRO-3, FSDP) are gathered and
            # autograd sees them; a penalty computed outside the forward can get no gradient there
            self.last_penalty = self.orthogonality_penalty()
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"{self.shared} rank={self.A.shape[0]}", f"s={self.scaling:g}"]
        if self.router is not None:
            parts.append(f"noise experts={self.noise_A.shape[0]}x{self.noise_A.shape[1]} top_k={self.top_k}")
        if self.am_A is not None:
            parts.append(f"alignment rank={self.am_A.shape[0]}")
        return ", ".join(parts)
