"""medmerge: adapt general LLMs to the clinical domain in weight space, verified."""

__version__ = "0.1.0"

from .errors import ConfigError, InputError, MedmergeError, OutputExistsError  # noqa: E402
from .merging import (  # noqa: E402
    InMemoryMerger,
    MergeConfig,
    MergeResult,
    load_plan,
    merge,
    merge_state_dicts,
    parse_config,
    verify,
)

from . import adapters  # noqa: E402,F401  (registers `model+lora` references for merges)

__all__ = [
    "ConfigError", "InMemoryMerger", "InputError", "MedmergeError", "MergeConfig", "MergeResult",
    "OutputExistsError", "load_plan", "merge", "merge_state_dicts", "parse_config", "verify",
]
