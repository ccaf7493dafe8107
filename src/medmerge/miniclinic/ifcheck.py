"""lm-eval's IFEval checkers, loaded offline, with langdetect made deterministic.

`change_case:english_lowercase` and `change_case:english_capital` call
`langdetect.detect`, which is random unless `DetectorFactory.seed` is set; the
world validates its responses and the evaluation scores answers with the seed
fixed at 0 (restored afterwards), so both give the same verdict every run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from ..evaluation import hooks
from ..evaluation.hooks import ifeval_utils as utils

LANGDETECT_SEED = 0


@contextlib.contextmanager
def seeded_langdetect(seed: int = LANGDETECT_SEED) -> Iterator[None]:
    from langdetect import DetectorFactory  # deferred, like lm-eval's IFEval module that needs it

    old = DetectorFactory.seed
    DetectorFactory.seed = seed
    try:
        yield
    finally:
        DetectorFactory.seed = old


def describe(instruction_id: str, kwargs: dict) -> str:
    """IFEval's own wording of an instruction (its `build_description`)."""
    utils()  # first: it finds punkt_tab offline before lm-eval's IFEval package is imported
    from lm_eval.tasks.ifeval import instructions_registry

    inst = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    return inst.build_description(**kwargs)


def follows(prompt: str, response: str, instruction_id_list: Sequence[str], kwargs: Sequence[dict]) -> list[bool]:
    """lm-eval's strict verdict for each instruction."""
    u = utils()
    inp = u.InputExample(key=0, instruction_id_list=list(instruction_id_list), prompt=prompt, kwargs=list(kwargs))
    with seeded_langdetect():
        return list(u.test_instruction_following_strict(inp, response).follow_instruction_list)


def process_results(doc: dict, results: Sequence[str]) -> dict:
    """lm-eval's IFEval process_results (via medmerge's hook), langdetect seeded."""
    with seeded_langdetect():
        return hooks.ifeval_process_results(doc, results)
