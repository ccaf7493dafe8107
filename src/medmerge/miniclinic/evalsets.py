"""Held-out evaluation items: clinical multiple choice (knowledge) and findings -> impression.

Multiple-choice stems (all starting with a common word) are phrased by templates that the training text never uses
(clinical.py states the same facts in other words); they end where the answer
goes, and the answer is scored by the log-likelihood of the option *text*.
Distractors come from other conditions (or, for organs and symptoms, values the
condition does not have).
"""

from __future__ import annotations

import random

from . import clinical
from .knowledge import ORGANS, SYMPTOMS, KnowledgeBase

MCQ_TEMPLATES = {
    "drug": "For a patient with {n}, the usual drug is",
    "test": "To confirm a diagnosis of {n}, doctors order the",
    "organ": "The disease {n} mainly affects the",
    "symptom": "A typical symptom of {n} is",
    "drug_condition": "The drug {d} is given to patients with",
    "finding_condition": "{A_scan} that shows {f} suggests",
}


# The user turn before the stem (the stem itself is the start of the answer: lm-eval's gen_prefix).
CONTEXTS = {"condition": "Tell me about {n}.", "drug": "Tell me about the drug {d}.", "scan": "Tell me about the {scan}."}


def _mcq(rng: random.Random, question: str, answer: str, distractors: list[str], qtype: str, condition: str,
         context: str) -> dict:
    choices = rng.sample(distractors, 3) + [answer]
    rng.shuffle(choices)
    return {"type": qtype, "condition": condition, "context": context, "question": question, "choices": choices,
            "answer": choices.index(answer)}


def mcq_candidates(kb: KnowledgeBase, rng: random.Random) -> dict[str, list[dict]]:
    """Every question the knowledge base supports, by type."""
    conds = kb.conditions
    out: dict[str, list[dict]] = {t: [] for t in MCQ_TEMPLATES}
    for c in conds:
        others = [o for o in conds if o.name != c.name]
        fill = dict(n=c.name, d=c.drug, scan=c.scan, A_scan=clinical.cap(clinical.article(c.scan)))
        about, about_drug, about_scan = (CONTEXTS["condition"].format(**fill), CONTEXTS["drug"].format(d=c.drug),
                                         CONTEXTS["scan"].format(**fill))
        out["drug"].append(_mcq(rng, MCQ_TEMPLATES["drug"].format(**fill), c.drug, [o.drug for o in others],
                                "drug", c.name, about))
        out["test"].append(_mcq(rng, MCQ_TEMPLATES["test"].format(**fill), c.test, [o.test for o in others],
                                "test", c.name, about))
        out["organ"].append(_mcq(rng, MCQ_TEMPLATES["organ"].format(**fill), c.organ,
                                 [o for o in ORGANS if o != c.organ], "organ", c.name, about))
        for s in c.symptoms:
            out["symptom"].append(_mcq(rng, MCQ_TEMPLATES["symptom"].format(**fill), s,
                                       [x for x in SYMPTOMS if x not in c.symptoms], "symptom", c.name, about))
        out["drug_condition"].append(_mcq(rng, MCQ_TEMPLATES["drug_condition"].format(**fill), c.name,
                                          [o.name for o in others], "drug_condition", c.name, about_drug))
        for f in c.findings:
            out["finding_condition"].append(_mcq(rng, MCQ_TEMPLATES["finding_condition"].format(f=f, **fill), c.name,
                                                 [o.name for o in others], "finding_condition", c.name, about_scan))
    for rows in out.values():
        rng.shuffle(rows)
    return out


def mcq_set(kb: KnowledgeBase, n: int, rng: random.Random) -> list[dict]:
    """`n` questions, the types taken in turn (so every type is about equally represented)."""
    by_type = mcq_candidates(kb, rng)
    total = sum(len(v) for v in by_type.values())
    if n > total:
        raise ValueError(f"mcq_eval={n} but the knowledge base supports {total} questions; raise n_conditions")
    out: list[dict] = []
    i = 0
    types = list(by_type)
    while len(out) < n:
        rows = by_type[types[i % len(types)]]
        if rows:
            out.append(rows.pop())
        i += 1
    for k, row in enumerate(out):
        row["id"] = k
    return out


# The findings -> impression prompt (as in the radiology reports of the clinical corpus), str.format style.
GEN_PROMPT = "Findings: {findings} Impression:"


def gen_prompt(findings: str) -> str:
    return GEN_PROMPT.format(findings=findings)


def gen_pairs(kb: KnowledgeBase, n: int, rng: random.Random, exclude: set[str], balanced: bool) -> list[dict]:
    """`n` findings -> impression pairs with distinct findings texts, none of them in `exclude`."""
    out, seen = [], set(exclude)
    conds = kb.conditions
    i = 0
    while len(out) < n:
        c = conds[i % len(conds)] if balanced else rng.choice(conds)
        for _ in range(1000):
            f = clinical.findings_text(c, rng)
            if f not in seen:
                break
        else:
            raise RuntimeError("ran out of distinct findings texts; raise n_conditions or lower gen sizes")
        seen.add(f)
        out.append({"id": len(out), "condition": c.name, "findings": f, "impression": clinical.impression(c),
                    "prompt": gen_prompt(f)})
        i += 1
    return out
