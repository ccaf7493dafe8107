"""Alignment data: format-following findings -> impression, graded by lm-eval's IFEval checkers.

A prompt is the findings -> impression prompt of mm_miniclinic_gen (`Findings: ...
Impression:`) followed by 1-2 constraints worded exactly as IFEval words them
(`ifcheck.describe`), drawn from those that make sense for a two-sentence answer:
lowercase, capitals, no commas, end phrase, postscript, title, quotation, JSON and
"less than N words". Every prompt also carries `keywords:existence` on the
condition's name, not stated in the prompt. So an answer counts only when it names
the right condition (knowledge, which the clinical text teaches) AND follows the
format (alignment, which the instruction data teaches): the task needs both.

The response is the impression of the reports, worded "The findings are consistent
with X. Recommend the T.", transformed to follow the constraints, and checked with
lm-eval's strict checker like the instruction data (instructions.py). It opens with
"The", not the reports' "Findings": the world's tokenizer has "findings" and
"FINDINGS" only after a space, so a lowercase or all-capitals answer could not
start with them, while "The", "the" and "THE" are tokens of the presets' worlds.
The tokenizer is trained without these texts (so that adding them changed no
other file of a world but world.json's counts), so a draw with a piece outside
its vocabulary (in a small world, '?"' may be one: an end phrase that is a
question, inside quotation marks) is redrawn like one that fails the checker:
every prompt and response written is encodable.

`world.generate` writes `align/train.jsonl` (prompt, response, instruction_id_list,
kwargs, condition, findings, id; findings of the training side) and
`eval/align.jsonl` (IFEval's input_data format; findings held out from every
training file), read by the `mm_miniclinic_align` task through `eval_dataset`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path

from ..evaluation.hooks import as_dataset
from ..io.records import DataError, read_jsonl, require_columns
from . import clinical, evalsets, ifcheck, instructions
from . import tokenizer as tokmod
from .instructions import CAPITAL, END, JSON, KEYWORD, LOWER, NO_COMMA, POSTSCRIPT, QUOTE, TITLE, WORDS
from .knowledge import Condition, KnowledgeBase

TASK = "mm_miniclinic_align"
EVAL_FILE = "eval/align.jsonl"
EVAL_COLUMNS = ("key", "prompt", "instruction_id_list", "kwargs")
# No bullets or paragraphs (the answer has two sentences) and only "less than" word counts (it has about ten words).
CONSTRAINTS = (LOWER, CAPITAL, NO_COMMA, END, POSTSCRIPT, TITLE, QUOTE, JSON, WORDS)
WORD_LIMITS = (15, 20, 25, 30)
TITLES = ("The Impression", "The Diagnosis")  # first words that are tokens in every case, see the docstring
_FINDINGS_RE = re.compile(r"^Findings: (.*?) Impression:")


def answer(c: Condition) -> str:
    """The impression as an aligned answer gives it (clinical.impression, opening with "The")."""
    text = clinical.impression(c)
    return "The " + text[0].lower() + text[1:]


def draw_constraints(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    chosen: list[str] = []
    while len(chosen) < n:
        chosen.append(rng.choice([c for c in CONSTRAINTS if all(instructions.compatible(c, x) for x in chosen)]))
    return [(c, draw_kwargs(c, rng)) for c in chosen]


def draw_kwargs(c: str, rng: random.Random) -> dict:
    if c == WORDS:
        return {"num_words": rng.choice(WORD_LIMITS), "relation": "less than"}
    return instructions.draw_kwargs(c, rng)


def make_prompt(findings: str, constraints: list[tuple[str, dict]]) -> str:
    return " ".join([evalsets.gen_prompt(findings), *(ifcheck.describe(c, kw) for c, kw in constraints)])


def findings_of(prompt: str) -> str:
    """The findings text of an align prompt."""
    m = _FINDINGS_RE.match(prompt)
    if not m:
        raise ValueError(f"not an align prompt (no 'Findings: ... Impression:' at its start): {prompt[:80]!r}")
    return m.group(1)


def render(c: Condition, constraints: dict[str, dict], rng: random.Random, closings: tuple[str, ...]) -> str:
    """`answer(c)` following `constraints` (the same layout as instructions.render)."""
    return instructions.apply_format(answer(c), constraints, lambda: rng.choice(TITLES), lambda: rng.choice(closings))


def examples(kb: KnowledgeBase, pairs: list[dict], rng: random.Random, n_constraints: Callable[[int], int],
             max_tokens: int, oov: Callable[[str], list[str]], attempts: int = 50) -> list[dict]:
    """One checked example per findings -> impression pair (evalsets.gen_pairs).

    The k-th gets `n_constraints(k)` constraints, redrawn until the response passes
    lm-eval's strict checker, fits `max_tokens` tokens (with </s>), and neither it nor
    the prompt has a piece that `oov` (the world's tokenizer) reports.
    """
    by_name = {c.name: c for c in kb.conditions}
    closings = {s.keyword: s.closings for s in instructions.subjects(kb) if s.kind == "condition"}
    out = []
    for k, pair in enumerate(pairs):
        c = by_name[pair["condition"]]
        n = n_constraints(k)
        unknown: set[str] = set()
        for _ in range(attempts):
            constraints = draw_constraints(rng, n)
            prompt = make_prompt(pair["findings"], constraints)
            ids = [i for i, _ in constraints] + [KEYWORD]
            kwargs = [kw for _, kw in constraints] + [{"keywords": [c.name]}]
            response = render(c, dict(constraints), rng, closings[c.name])
            pieces = oov(prompt) + oov(response)
            unknown.update(pieces)
            if (not pieces and tokmod.count_pieces(response) + 1 <= max_tokens
                    and all(ifcheck.follows(prompt, response, ids, kwargs))):
                break
        else:
            raise RuntimeError(f"no checked align example for {c.name} in {attempts} draws of {n} constraints"
                               + (f"; pieces outside the tokenizer's vocabulary: {sorted(unknown)[:10]} (reword "
                                  "align.py's templates with pieces the world's training text has)" if unknown
                                  else ""))
        out.append({"id": k, "prompt": prompt, "response": response, "instruction_id_list": ids, "kwargs": kwargs,
                    "condition": c.name, "findings": pair["findings"]})
    return out


def train_record(row: dict) -> dict:
    return {k: row[k] for k in ("id", "prompt", "response", "instruction_id_list", "kwargs", "condition",
                                "findings")}


def eval_record(row: dict) -> dict:
    """IFEval's input_data format (the condition is the keywords:existence argument)."""
    return {"key": row["id"], "prompt": row["prompt"], "instruction_id_list": row["instruction_id_list"],
            "kwargs": row["kwargs"]}


# --- the lm-eval task's dataset (tasks/mm_miniclinic_align.yaml, via tasks/hooks.py) ---------------------


def eval_path(data_dir: str | Path | None = None) -> Path:
    root = data_dir or os.environ.get("MEDMERGE_DATA")
    if not root:
        raise DataError(f"{TASK} needs a MiniClinic world: pass --data-dir OUT/data (the data/ folder that "
                        "medmerge.miniclinic.world.generate wrote) or set MEDMERGE_DATA")
    path = Path(root).expanduser() / EVAL_FILE
    if not path.is_file():
        raise DataError(f"{TASK} needs {path}, which does not exist; --data-dir must be the data/ folder of a "
                        "MiniClinic world, and worlds generated before the align sets existed have none: "
                        "generate it again with medmerge.miniclinic.world.generate")
    return path


def load_eval(data_dir: str | Path | None = None) -> list[dict]:
    path = eval_path(data_dir)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no records")
    require_columns(rows, EVAL_COLUMNS, path)
    return rows


def eval_dataset(data_dir=None, **_):
    return as_dataset(load_eval(data_dir))
