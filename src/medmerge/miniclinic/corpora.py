"""The two pre-training corpora: general text and clinical text, one document per line."""

from __future__ import annotations

import random

from . import clinical
from .knowledge import KnowledgeBase
from .lexicon import TOPICS, story, topic_sentences

CASE_SHARE = 0.03  # of general documents all lowercase, and as many all UPPERCASE
CLINICAL_KINDS = (("fact_sheet", 0.3), ("clinic_note", 0.2), ("radiology_report", 0.25),
                  ("discharge_summary", 0.15), ("drug_leaflet", 0.1))


def general_document(rng: random.Random) -> str:
    """A story or 1-2 topics' facts; 80% with commas where natural; a few all lowercase or all UPPERCASE."""
    commas = rng.random() < 0.8
    if rng.random() < 0.25:
        sents = story(rng, commas)
        text = " ".join(sents[: rng.randint(4, len(sents))])
    else:
        topics = rng.sample(TOPICS, rng.choice((1, 1, 2)))
        sents: list[str] = []
        for t in topics:
            pool = topic_sentences(t, rng, commas)
            sents += pool[: rng.randint(3, min(7, len(pool)))]
        text = " ".join(sents)
    case = rng.random()
    if case < CASE_SHARE:
        return text.lower()
    if case < 2 * CASE_SHARE:
        return text.upper()
    return text


def general(n: int, rng: random.Random) -> list[str]:
    return [general_document(rng) for _ in range(n)]


def clinical_document(kb: KnowledgeBase, rng: random.Random, exclude_findings: set[str]) -> tuple[str, str]:
    kinds, weights = zip(*CLINICAL_KINDS)
    kind = rng.choices(kinds, weights)[0]
    c = rng.choice(kb.conditions)
    if kind == "radiology_report":
        while True:
            f = clinical.findings_text(c, rng)
            if f not in exclude_findings:
                break
        return kind, clinical.radiology_report(c, rng, f)
    return kind, getattr(clinical, kind)(c, rng)


def clinical_corpus(kb: KnowledgeBase, n: int, rng: random.Random, exclude_findings: set[str]) -> list[str]:
    return [clinical_document(kb, rng, exclude_findings)[1] for _ in range(n)]
