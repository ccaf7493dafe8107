"""Forgetting-aware evaluation on lm-evaluation-harness: `evaluate` (medmerge eval) and `compare`.

registry (which tasks, checked before loading) -> runner (evaluate) -> results (results.json) -> compare;
data, taskfile, hooks, metrics and nltk_data are what the tasks read and compute with.
"""

from .compare import compare
from .runner import evaluate

__all__ = ["compare", "evaluate"]
