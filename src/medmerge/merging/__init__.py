"""The merge engine: a mergekit-style config and local folders in, a checked, streamed, verified merge out.

config (parse) -> plan (every check, headers only) -> compute (one tensor) -> execute (streamed, threaded)
-> api.merge (outputs, provenance, post-merge check, atomic move); inmemory for sweeps; verify to recompute.
"""

from .api import MergeResult, load_plan, merge
from .config import MergeConfig, parse_config
from .inmemory import InMemoryMerger, merge_state_dicts
from .multi import is_multi, merge_chain
from .verify import verify

__all__ = ["InMemoryMerger", "MergeConfig", "MergeResult", "is_multi", "load_plan", "merge", "merge_chain",
           "merge_state_dicts", "parse_config", "verify"]
