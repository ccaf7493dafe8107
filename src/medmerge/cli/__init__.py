"""The `medmerge` command line: each command parses its options, calls one library function, prints the result.

One file per command group; `common.command` turns errors into exit codes for all of them.
"""

# Imported in the pipeline's order, which is the order `medmerge --help` lists the commands in.
from . import merge  # noqa: F401, I001  (merge, verify, methods)
from . import gguf  # noqa: F401  (import-gguf)
from . import evaluate  # noqa: F401  (eval, compare, tasks, setup-nltk)
from . import train  # noqa: F401  (train, stats)
from . import miniclinic  # noqa: F401  (miniclinic build)
from . import adapters  # noqa: F401  (adapters merge)
from . import medcare  # noqa: F401  (medcare stage1 | stage2 | export)
from . import experiments  # noqa: F401  (demo, sweep, fewshot, report, pipeline two-stage-lora | medcare)
from . import analyze  # noqa: F401  (analyze decoding | leakage | loss)
from .app import app

__all__ = ["app"]
