"""Clinical text from the knowledge base: fact sentences, notes, radiology reports, discharge summaries.

Every statement is a fact of the knowledge base (a condition's own symptoms,
findings, drug, test, organ), phrased by one of several templates. The
multiple-choice questions use *other* phrasings (see evalsets.py), so no question
string occurs in the training text.
"""

from __future__ import annotations

import random

from .knowledge import ORGANS, SYMPTOMS, Condition

SEXES = (("man", "He"), ("woman", "She"))


def listing(items, commas: bool) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    if commas:
        return ", ".join(items[:-1]) + " and " + items[-1]
    return " and ".join(items)


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def impression(c: Condition) -> str:
    """The impression a report of condition `c` ends with (a fixed template)."""
    return f"Findings are consistent with {c.name}. Recommend the {c.test}."


def finding_sentence(f: str, rng: random.Random) -> str:
    return rng.choice((f"There is {f}.", f"{cap(f)} is seen.", f"{cap(f)} is noted."))


def findings_text(c: Condition, rng: random.Random) -> str:
    """A findings section: 2-3 of the condition's findings and 0-2 normal statements, shuffled."""
    chosen = rng.sample(c.findings, rng.choice((2, 3)))
    sentences = [finding_sentence(f, rng) for f in chosen]
    normals = ORGANS[c.organ]["normals"]
    sentences += rng.sample(normals, rng.choice((0, 1, 1, 2)))
    rng.shuffle(sentences)
    if rng.random() < 0.3:
        sentences.append("No other abnormality is seen.")
    return " ".join(sentences)


def fact_sentences(c: Condition, rng: random.Random, commas: bool = True) -> dict[str, list[str]]:
    """Fact sentences about `c`, grouped by relation (organ, symptoms, drug, test, findings, drug facts)."""
    n, N, d, D, t = c.name, c.Name, c.drug, c.Drug, c.test
    sym = list(c.symptoms)
    rng.shuffle(sym)
    sym_text = listing(sym, commas)
    f = rng.choice(c.findings)
    e = listing(c.side_effects, commas)
    return {
        "organ": [f"{N} is a disease of the {c.organ}.", f"{N} affects the {c.organ}.",
                  f"In {n}, the {c.organ} is damaged." if commas else f"In {n} the {c.organ} is damaged."],
        "symptoms": [f"Common symptoms of {n} are {sym_text}.", f"Patients with {n} often have {sym_text}.",
                     f"{N} causes {sym_text}.", f"{N} usually presents with {sym_text}."],
        "drug": [f"{N} is treated with {d}.", f"The drug of choice for {n} is {d}.",
                 f"Patients with {n} receive {d}.", f"{D} is used to treat {n}.", f"{D} is a drug for {n}."],
        "test": [f"The diagnosis of {n} is confirmed with the {t}.", f"The {t} is used to confirm {n}.",
                 f"Doctors use the {t} to diagnose {n}.", f"A positive {t} confirms {n}."],
        "findings": [f"{cap(article(c.scan))} in {n} may show {f}.",
                     f"In {n}, the {c.scan} often shows {f}." if commas else f"In {n} the {c.scan} often shows {f}.",
                     f"{cap(f)} on {article(c.scan)} is typical of {n}."],
        "drug_facts": [f"Common side effects of {d} are {e}.",
                       f"{D} is taken {c.schedule}." if rng.random() < 0.6 else
                       f"The usual schedule for {d} is {c.schedule}.",
                       f"{D} can cause {e}."],
    }


def condition_summary(c: Condition, rng: random.Random, commas: bool = True, k: int = 4) -> list[str]:
    """`k` fact sentences about `c` from different relations, the first naming the condition."""
    facts = fact_sentences(c, rng, commas)
    relations = ["organ", "symptoms", "drug", "test", "findings"]
    rng.shuffle(relations)
    return [rng.choice(facts[r]) for r in relations[:k]]


def drug_summary(c: Condition, rng: random.Random, commas: bool = True, k: int = 3) -> list[str]:
    facts = fact_sentences(c, rng, commas)
    pool = [rng.choice(facts["drug"][3:]), *facts["drug_facts"][:2], rng.choice(facts["drug"][:3])]
    first, rest = pool[0], pool[1:]
    rng.shuffle(rest)
    return [first, *rest][:k]


# --- documents (one line each) --------------------------------------------------------------------


def fact_sheet(c: Condition, rng: random.Random) -> str:
    facts = fact_sentences(c, rng)
    relations = list(facts)
    rng.shuffle(relations)
    k = rng.randint(4, len(relations))
    return " ".join(rng.choice(facts[r]) for r in relations[:k])


def clinic_note(c: Condition, rng: random.Random) -> str:
    sex, He = rng.choice(SEXES)
    sym = list(c.symptoms)
    rng.shuffle(sym)
    age = rng.randrange(20, 90, 5)
    days = rng.randint(2, 14)
    parts = [
        "Clinic note.",
        f"A {age} year old {sex} presents with {sym[0]} and {sym[1]} for {days} days.",
    ]
    if rng.random() < 0.7:
        parts.append(f"{He} also reports {sym[2]}.")
    else:
        parts.append(f"{He} denies {rng.choice([s for s in SYMPTOMS if s not in c.symptoms])}.")
    if rng.random() < 0.7:
        f = rng.choice(c.findings)
        parts.append(rng.choice((f"The {c.scan} shows {f}.", f"The {c.scan} shows {f}, which suggests {c.name}.")))
    parts.append(rng.choice((f"The {c.test} is positive.", f"The {c.test} confirms {c.name}.")))
    parts.append(f"Assessment: {c.name}.")
    weeks = rng.randint(1, 6)
    parts.append(rng.choice((f"Plan: start {c.drug} {c.schedule} and follow up in {weeks} weeks.",
                             f"Plan: order the {c.test}, start {c.drug} and follow up in {weeks} weeks.")))
    return " ".join(parts)


def radiology_report(c: Condition, rng: random.Random, findings: str) -> str:
    head = [f"{cap(c.scan)}."]
    if rng.random() < 0.5:
        sym = rng.sample(c.symptoms, 2)
        head.append(f"Indication: {sym[0]} and {sym[1]}.")
    return " ".join([*head, f"Findings: {findings}", f"Impression: {impression(c)}"])


def discharge_summary(c: Condition, rng: random.Random) -> str:
    sym = rng.sample(c.symptoms, 2)
    days = rng.randint(2, 12)
    return " ".join([
        "Discharge summary.",
        f"The patient was admitted with {sym[0]} and {sym[1]}.",
        f"The main symptom was {sym[0]}.",
        f"{cap(article(c.scan))} showed {rng.choice(c.findings)}.",
        f"The {c.test} confirmed {c.name}.",
        rng.choice((f"The patient was treated with {c.drug} and improved over {days} days.",
                    f"The patient was given {c.drug} and improved over {days} days.")),
        f"Discharge diagnosis: {c.name}.",
        f"Discharge medication: {c.drug} {c.schedule}.",
        f"Follow up in {rng.randint(1, 6)} weeks.",
    ])


def drug_leaflet(c: Condition, rng: random.Random) -> str:
    facts = fact_sentences(c, rng)
    out = [f"{c.Drug} is a drug used to treat {c.name}.", *facts["drug_facts"][1:2],
           rng.choice(facts["drug_facts"][::2]), rng.choice(facts["drug"][:3])]
    if rng.random() < 0.5:
        out.append(f"Before starting {c.drug} doctors confirm {c.name} with the {c.test}.")
    return " ".join(out)


DOC_KINDS = ("fact_sheet", "clinic_note", "radiology_report", "discharge_summary", "drug_leaflet")
