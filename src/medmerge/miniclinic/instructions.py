"""Instruction-following data graded by lm-eval's IFEval checkers.

A prompt asks for a short text about a subject (a general topic, a condition or a
drug) and adds 0-2 constraints worded exactly as IFEval words them (lm-eval's own
`build_description`). Every prompt also carries `keywords:existence` on the
subject word, unstated in the prompt: the topic named in the prompt is the word
a response on topic contains. So an answer only counts as following the prompt
when it is on topic (a lowercase, comma-free answer about something else fails).

Responses are built by templates that follow every constraint, then checked with
lm-eval's strict checker (`test_instruction_following_strict`); a response that
fails, or would not fit in `max_tokens` tokens, is rebuilt or its constraints
redrawn, so every example written passes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Optional

from . import ifcheck
from .knowledge import Condition, KnowledgeBase
from .lexicon import TOPICS, Topic, closing_sentences, topic_sentences

LOWER = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
END = "startend:end_checker"
POSTSCRIPT = "detectable_content:postscript"
BULLETS = "detectable_format:number_bullet_lists"
TITLE = "detectable_format:title"
WORDS = "length_constraints:number_words"
JSON = "detectable_format:json_format"
QUOTE = "startend:quotation"
PARAGRAPHS = "length_constraints:number_paragraphs"
KEYWORD = "keywords:existence"

CONSTRAINTS = (LOWER, CAPITAL, NO_COMMA, END, POSTSCRIPT, BULLETS, TITLE, WORDS, JSON, QUOTE, PARAGRAPHS)
INSTRUCTION_TYPES = CONSTRAINTS + (KEYWORD,)
_CONFLICTS = {
    frozenset((LOWER, CAPITAL)), frozenset((BULLETS, PARAGRAPHS)), frozenset((BULLETS, QUOTE)),
    *(frozenset((JSON, x)) for x in (TITLE, BULLETS, POSTSCRIPT, END, QUOTE, PARAGRAPHS)),
}
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "Thank you for reading.")
PS_MARKERS = ("P.S.", "P.P.S")
GENERAL_TASKS = ("Write a short text about {np}.", "Write a few sentences about {np}.", "Tell me about {np}.",
                 "Describe {np}.", "Write a short paragraph about {np}.")
CLINICAL_TASKS = ("Write a short note about {np}.", "Explain {np} to a patient.", "Tell me about {np}.",
                  "Describe {np}.", "Write a few sentences about {np}.")
# Descriptions that end without a full stop (they quote markdown) go last in a prompt.
_LAST = (BULLETS, PARAGRAPHS)


def compatible(a: str, b: str) -> bool:
    return a != b and frozenset((a, b)) not in _CONFLICTS


@dataclass(frozen=True)
class Subject:
    keyword: str
    np: str  # as named in the prompt
    kind: str  # general, condition, drug
    sentences: Callable[[random.Random, bool], list[str]]
    closings: tuple[str, ...]


def subjects(kb: KnowledgeBase) -> list[Subject]:
    out = [Subject(t.word, t.np, "general", _general(t), tuple(closing_sentences(t))) for t in TOPICS]
    for c in kb.conditions:
        out.append(Subject(c.name, c.name, "condition", _condition(c),
                           (f"Ask your doctor about {c.name}.", f"I hope this helps you understand {c.name}.")))
        out.append(Subject(c.drug, f"the drug {c.drug}", "drug", _drug(c),
                           (f"Ask your doctor before you take {c.drug}.", f"Take {c.drug} as your doctor says.")))
    return out


def _general(t: Topic):
    return lambda rng, commas: topic_sentences(t, rng, commas)


def _condition(c: Condition):
    return lambda rng, commas: care_sentences(c.name, "condition", rng, commas)


def _drug(c: Condition):
    return lambda rng, commas: care_sentences(c.drug, "drug", rng, commas)


def care_sentences(name: str, kind: str, rng: random.Random, commas: bool) -> list[str]:
    """What a general assistant says about a condition or a drug: sensible, on topic, and no clinical fact.

    None of these sentences states a fact of the knowledge base (organ, symptom,
    finding, drug, test, side effect, schedule). Instruction tuning teaches how to
    answer, not what is true in the clinic; the facts are learned from pre-training
    text (some in `base`, much more in `clinical`), as for real instruct models and
    their clinical counterparts. An earlier design put fact sheets in the clinical
    SFT answers, and `instruct` then knew as much as `clinical` (full preset: MCQ
    0.735 against 0.760).
    """
    if kind == "condition":
        out = [
            f"If you think you have {name}, see a doctor." if commas else f"See a doctor if you think you have {name}.",
            f"Many people live well with {name}.",
            f"A doctor can tell you more about {name}.",
            f"It helps to learn about {name}.",
            f"Many people with {name} feel better with good care.",
            f"Your family can help you cope with {name}.",
            f"Write down your questions about {name}.",
            f"With care, {name} can be managed." if commas else f"{name[0].upper() + name[1:]} can be managed with care.",
            f"Every patient with {name} is different.",
        ]
    else:
        out = [
            f"Read the label before you take {name}.",
            f"Your doctor can tell you if {name} is right for you.",
            f"If you have questions about {name}, ask a pharmacist." if commas
            else f"Ask a pharmacist if you have questions about {name}.",
            f"Keep {name} in a safe place.",
            f"Do not share {name} with other people.",
            f"Tell your doctor about other drugs you take with {name}.",
            f"Many patients take {name} at home.",
            f"Store {name} away from children.",
        ]
    return _name_inside_first(out, name, rng)


def _name_inside_first(sentences: list[str], name: str, rng: random.Random) -> list[str]:
    """Shuffled, but opening with a sentence that has the made-up name inside, as in the prompt.

    The prompt holds the name after a space (one token, `Ġname`); a first sentence that
    starts with the capitalised name would need another token (`Name`), which a tiny
    model has rarely seen, so the on-topic answer is easier to learn this way.
    """
    rng.shuffle(sentences)
    inside = [s for s in sentences if f" {name}" in s]
    first = rng.choice(inside) if inside else sentences[0]
    return [first, *(s for s in sentences if s is not first)]


@dataclass
class Example:
    prompt: str
    response: Optional[str]
    instruction_id_list: list[str]
    kwargs: list[dict]
    subject: str
    kind: str

    def sft_record(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "instruction_id_list": self.instruction_id_list,
                "kwargs": self.kwargs, "subject": self.subject, "kind": self.kind}

    def eval_record(self, key: int) -> dict:
        return {"key": key, "prompt": self.prompt, "instruction_id_list": self.instruction_id_list,
                "kwargs": self.kwargs}


def draw_constraints(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    chosen: list[str] = []
    while len(chosen) < n:
        options = [c for c in CONSTRAINTS if all(compatible(c, x) for x in chosen)]
        chosen.append(rng.choice(options))
    return [(c, draw_kwargs(c, rng)) for c in chosen]


def draw_kwargs(c: str, rng: random.Random) -> dict:
    if c == END:
        return {"end_phrase": rng.choice(END_PHRASES)}
    if c == POSTSCRIPT:
        return {"postscript_marker": rng.choice(PS_MARKERS)}
    if c == BULLETS:
        return {"num_bullets": rng.randint(2, 4)}
    if c == PARAGRAPHS:
        return {"num_paragraphs": rng.choice((2, 3))}
    if c == WORDS:
        if rng.random() < 0.5:
            return {"num_words": rng.choice((10, 15, 20, 25)), "relation": "less than"}
        return {"num_words": rng.choice((20, 25, 30)), "relation": "at least"}
    return {}


def make_prompt(subject: Subject, constraints: list[tuple[str, dict]], rng: random.Random) -> str:
    tasks = CLINICAL_TASKS if subject.kind != "general" else GENERAL_TASKS
    parts = [rng.choice(tasks).format(np=subject.np)]
    ordered = [c for c in constraints if c[0] not in _LAST] + [c for c in constraints if c[0] in _LAST]
    parts += [ifcheck.describe(c, kw) for c, kw in ordered]
    return " ".join(parts)


def _title(subject: Subject, rng: random.Random) -> str:
    base = rng.choice(("{np}", "All about {np}", "A note on {np}")).format(np=subject.np)
    return " ".join(w[0].upper() + w[1:] for w in base.split())


def render(subject: Subject, constraints: dict[str, dict], rng: random.Random, n_sentences: int,
           commas: bool) -> str:
    """One response with `n_sentences` content sentences (bullets, paragraphs) following `constraints`."""
    pool = subject.sentences(rng, commas)
    n = min(n_sentences, len(pool))
    sents = pool[:n]
    if BULLETS in constraints:
        body = "\n".join(f"* {s}" for s in sents)
    elif PARAGRAPHS in constraints:
        k = constraints[PARAGRAPHS]["num_paragraphs"]
        groups = [sents[i::k] for i in range(k)]
        body = "\n***\n".join(" ".join(g) for g in groups)
    else:
        body = " ".join(sents)
    return apply_format(body, constraints, lambda: _title(subject, rng), lambda: rng.choice(subject.closings))


def apply_format(body: str, constraints: dict[str, dict], title: Callable[[], str], closing: Callable[[], str]) -> str:
    """`body` with the whole-response constraints applied: JSON, title, postscript, end phrase, quotation, case.

    `title()` and `closing()` are called only when a title or a postscript is asked for, in that order,
    so that callers drawing them from a random stream draw exactly what they need.
    """
    if JSON in constraints:
        body = json.dumps({"answer": body})
    lines = [body]
    if TITLE in constraints:
        lines.insert(0, f"<<{title()}>>")
    if POSTSCRIPT in constraints:
        marker = constraints[POSTSCRIPT]["postscript_marker"]
        lines.append(f"{'P.P.S.' if marker == 'P.P.S' else marker} {closing()}")
    if END in constraints:
        lines[-1] += " " + constraints[END]["end_phrase"]
    text = "\n".join(lines)
    if QUOTE in constraints:
        text = f'"{text}"'
    if LOWER in constraints:
        text = text.lower()
    if CAPITAL in constraints:
        text = text.upper()
    return text


def _sentence_counts(constraints: dict[str, dict], rng: random.Random) -> list[int]:
    """The numbers of content sentences to try, best first."""
    if BULLETS in constraints:
        return [constraints[BULLETS]["num_bullets"]]
    low = constraints[PARAGRAPHS]["num_paragraphs"] if PARAGRAPHS in constraints else 1
    default = max(low, rng.randint(2, 4))
    if WORDS in constraints and constraints[WORDS]["relation"] == "at least":
        return list(range(max(low, 3), 8))
    if WORDS in constraints:
        return list(range(default, low - 1, -1))
    return list(range(default, low - 1, -1))


class Builder:
    """Draws prompts and builds checked responses (deterministic in its rng)."""

    def __init__(self, kb: KnowledgeBase, rng: random.Random, count_tokens: Callable[[str], int], max_tokens: int,
                 clinical_fraction: float):
        self.subjects = subjects(kb)
        self.general = [s for s in self.subjects if s.kind == "general"]
        self.clinical = [s for s in self.subjects if s.kind != "general"]
        self.rng = rng
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.clinical_fraction = clinical_fraction
        self.rejected = 0

    def respond(self, subject: Subject, prompt: str, ids: list[str], kwargs: list[dict]) -> Optional[str]:
        constraints = dict(zip(ids, kwargs))
        commas = NO_COMMA not in constraints and self.rng.random() < 0.85
        for n in _sentence_counts(constraints, self.rng):
            response = render(subject, constraints, self.rng, n, commas)
            if self.count_tokens(response) + 1 > self.max_tokens:
                continue
            if all(ifcheck.follows(prompt, response, ids, kwargs)):
                return response
            self.rejected += 1
        return None

    def example(self, n_constraints: int, with_response: bool = True, attempts: int = 50) -> Example:
        rng = self.rng
        for _ in range(attempts):
            pool = self.clinical if rng.random() < self.clinical_fraction else self.general
            subject = rng.choice(pool)
            constraints = draw_constraints(rng, n_constraints)
            prompt = make_prompt(subject, constraints, rng)
            ids = [c for c, _ in constraints] + [KEYWORD]
            kwargs = [kw for _, kw in constraints] + [{"keywords": [subject.keyword]}]
            response = self.respond(subject, prompt, ids, kwargs)
            if response is None:
                continue
            return Example(prompt, response if with_response else None, ids, kwargs, subject.keyword, subject.kind)
        raise RuntimeError(f"could not build a checked response in {attempts} draws")
