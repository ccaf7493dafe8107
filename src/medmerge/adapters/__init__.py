"""LoRA adapters as exact weight deltas: read (lora), open and check (inputs), combine, merge and export, verify."""

from ..io import checkpoint as _checkpoint
from .materialize import materialize

# `model: BASE+ADAPTER` in merge configs resolves through this layer's exact adapter merge (io cannot apply one)
_checkpoint.LORA_RESOLVER[:] = [materialize]
