"""The synthetic knowledge base: made-up conditions, each with fixed symptoms, findings, drug and test.

Nothing here is real medicine. Condition, drug and test names are invented from
syllables (seeded), so a model can only know them from the world's own text.
Every condition has: an organ, three symptoms (a set no other condition has), three
imaging findings (strings no other condition has), one drug (unique) with two side
effects and a dosing schedule, and one diagnostic test (unique).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SYMPTOMS = (
    "fever", "cough", "headache", "rash", "fatigue", "nausea", "vomiting", "dizziness", "chest pain",
    "joint pain", "back pain", "abdominal pain", "weight loss", "night sweats", "shortness of breath",
    "blurred vision", "dry skin", "itching", "swelling", "muscle weakness", "confusion", "sore throat",
    "palpitations", "insomnia",
)
SIDE_EFFECTS = ("nausea", "headache", "rash", "dizziness", "dry mouth", "fatigue", "diarrhea", "insomnia")
SCHEDULES = ("once a day", "twice a day", "three times a day", "once a week")
DESCRIPTORS = ("small", "large", "round", "dense", "patchy", "irregular", "faint")

# organ -> scan, locations, lesions, normal statements (sentences a report adds that name no condition)
ORGANS: dict[str, dict] = {
    "lung": dict(scan="chest scan",
                 locations=("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe"),
                 lesions=("nodule", "opacity", "cavity", "cyst"),
                 normals=("The heart size is normal.", "No pleural effusion is seen.", "The airways are clear.")),
    "liver": dict(scan="abdominal scan",
                  locations=("right liver lobe", "left liver lobe", "liver hilum"),
                  lesions=("lesion", "cyst", "mass", "calcification"),
                  normals=("The spleen is normal.", "No free fluid is seen.", "The gallbladder is normal.")),
    "kidney": dict(scan="renal scan",
                   locations=("left kidney", "right kidney", "renal pelvis"),
                   lesions=("stone", "cyst", "mass", "scar"),
                   normals=("The bladder is normal.", "No free fluid is seen.", "The ureters are normal.")),
    "heart": dict(scan="cardiac scan",
                  locations=("left ventricle", "right ventricle", "left atrium", "right atrium"),
                  lesions=("mass", "clot", "calcification", "bulge"),
                  normals=("The lungs are clear.", "No pericardial effusion is seen.", "The valves are normal.")),
    "brain": dict(scan="head scan",
                  locations=("frontal lobe", "temporal lobe", "parietal lobe", "occipital lobe"),
                  lesions=("lesion", "bleed", "cyst", "mass"),
                  normals=("The ventricles are normal.", "No midline shift is seen.", "The skull is intact.")),
    "bowel": dict(scan="abdominal scan",
                  locations=("small bowel", "colon", "rectum", "appendix"),
                  lesions=("thickening", "mass", "narrowing", "polyp"),
                  normals=("The liver is normal.", "No free air is seen.", "The spleen is normal.")),
    "bone": dict(scan="bone scan",
                 locations=("spine", "pelvis", "left femur", "right femur"),
                 lesions=("fracture", "lesion", "erosion", "cyst"),
                 normals=("The joints are normal.", "No soft tissue swelling is seen.", "Bone density is normal.")),
    "thyroid": dict(scan="neck scan",
                    locations=("left thyroid lobe", "right thyroid lobe", "thyroid isthmus"),
                    lesions=("nodule", "cyst", "calcification", "mass"),
                    normals=("The neck vessels are normal.", "No enlarged lymph nodes are seen.",
                             "The trachea is midline.")),
}

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "r", "n", "l", "s", "x")
CONDITION_SUFFIXES = ("osis", "itis", "emia", "oma", "algia", "opathy", "iasis")
DRUG_SUFFIXES = ("mab", "pril", "cillin", "azole", "statin", "vir", "olol", "pine", "done", "mycin")
TEST_KINDS = ("assay", "panel", "test")


@dataclass(frozen=True)
class Condition:
    name: str
    organ: str
    scan: str
    symptoms: tuple[str, ...]
    findings: tuple[str, ...]
    drug: str
    side_effects: tuple[str, ...]
    schedule: str
    test: str

    @property
    def Name(self) -> str:
        return self.name[0].upper() + self.name[1:]

    @property
    def Drug(self) -> str:
        return self.drug[0].upper() + self.drug[1:]


@dataclass(frozen=True)
class KnowledgeBase:
    conditions: tuple[Condition, ...]

    def to_json(self) -> dict:
        return {
            "conditions": [asdict(c) for c in self.conditions],
            "organs": {k: {"scan": v["scan"], "locations": list(v["locations"]), "normals": list(v["normals"])}
                       for k, v in ORGANS.items()},
            "symptoms": list(SYMPTOMS),
            "side_effects": list(SIDE_EFFECTS),
        }

    @classmethod
    def from_json(cls, obj: dict) -> "KnowledgeBase":
        conds = []
        for c in obj["conditions"]:
            c = dict(c)
            for k in ("symptoms", "findings", "side_effects"):
                c[k] = tuple(c[k])
            conds.append(Condition(**c))
        return cls(tuple(conds))

    def by_name(self, name: str) -> Condition:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(name)

    def phrases(self) -> list[str]:
        """Every phrase the clinical side can use (for the tokenizer's case forms)."""
        out = [*SYMPTOMS, *SIDE_EFFECTS, *SCHEDULES, *DESCRIPTORS, *TEST_KINDS]
        for organ, spec in ORGANS.items():
            out += [organ, spec["scan"], *spec["locations"], *spec["lesions"], *spec["normals"]]
        return out + self.made_up_words()

    def made_up_words(self) -> list[str]:
        out = []
        for c in self.conditions:
            out += [c.name, c.drug, c.test.split()[0]]
        return out


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _word(rng: random.Random, syllables: int, coda: bool = True) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + (rng.choice(CODAS) if coda else "")


def _fresh(rng: random.Random, make, taken: list[str], reserved: set[str]) -> str:
    """A made-up word that is neither a substring of a taken/reserved word nor contains one."""
    for _ in range(10_000):
        w = make()
        if w in reserved or any(w in t or t in w for t in taken):
            continue
        if any(w in r or (len(r) > 3 and r in w) for r in reserved):
            continue
        taken.append(w)
        return w
    raise RuntimeError("could not invent a fresh word; lower n_conditions")


def build(n_conditions: int, seed: int, reserved_words: set[str]) -> KnowledgeBase:
    """A consistent knowledge base of `n_conditions` made-up conditions (deterministic in `seed`)."""
    rng = random.Random(f"miniclinic-kb-{seed}")
    organs = list(ORGANS)
    taken: list[str] = []
    used_symptom_sets: set[tuple[str, ...]] = set()
    used_findings: set[str] = set()
    conditions = []
    for i in range(n_conditions):
        organ = organs[i % len(organs)] if i < len(organs) else rng.choice(organs)
        spec = ORGANS[organ]
        name = _fresh(rng, lambda: _word(rng, 2).rstrip("aeiou") + rng.choice(CONDITION_SUFFIXES), taken,
                      reserved_words)
        drug = _fresh(rng, lambda: _word(rng, 2).rstrip("aeiou") + rng.choice(DRUG_SUFFIXES), taken, reserved_words)
        test_word = _fresh(rng, lambda: _word(rng, 2, coda=False) + rng.choice(("x", "n", "r", "l")), taken, reserved_words)
        while True:
            symptoms = tuple(sorted(rng.sample(SYMPTOMS, 3)))
            if symptoms not in used_symptom_sets:
                used_symptom_sets.add(symptoms)
                break
        findings: list[str] = []
        for _ in range(1000):
            f = (_article(f"{rng.choice(DESCRIPTORS)} {rng.choice(spec['lesions'])}")
                 + f" in the {rng.choice(spec['locations'])}")
            if f not in used_findings and f not in findings:
                findings.append(f)
                if len(findings) == 3:
                    break
        else:  # pragma: no cover - the finding space per organ is ~100 strings
            raise RuntimeError("ran out of distinct findings; lower n_conditions")
        used_findings.update(findings)
        conditions.append(Condition(
            name=name, organ=organ, scan=spec["scan"], symptoms=symptoms, findings=tuple(findings), drug=drug,
            side_effects=tuple(sorted(rng.sample(SIDE_EFFECTS, 2))), schedule=rng.choice(SCHEDULES),
            test=f"{test_word} {rng.choice(TEST_KINDS)}",
        ))
    return KnowledgeBase(tuple(conditions))
