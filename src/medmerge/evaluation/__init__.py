"""Forgetting-aware evaluation on lm-evaluation-harness: `evaluate` (medmerge eval) and `compare`."""

from .compare import compare
from .runner import evaluate

__all__ = ["compare", "evaluate"]
