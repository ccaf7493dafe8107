"""medmerge: adapt general LLMs to the clinical domain in weight space, verified."""

__version__ = "0.1.0"

from .config import MergeConfig, parse_config  # noqa: E402
from .errors import ConfigError, InputError, MedmergeError, OutputExistsError  # noqa: E402
from .inmemory import InMemoryMerger, merge_state_dicts  # noqa: E402
from .merge import MergeResult, load_plan, merge  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = [
    "ConfigError", "InMemoryMerger", "InputError", "MedmergeError", "MergeConfig", "MergeResult",
    "OutputExistsError", "load_plan", "merge", "merge_state_dicts", "parse_config", "verify",
]
