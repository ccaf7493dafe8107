"""mm_ifeval's verdicts against lm-eval's own IFEval checkers, on the real prompts in ../shared/data/ifeval.

For each of the 25 instruction types: a real single-instruction prompt, a hand-written response
that follows it and one that violates it. The hand verdict must equal both medmerge's
`ifeval_process_results` and lm-eval's checker called directly. Then the four aggregate metrics
on a few multi-instruction prompts are checked against a hand computation, directly and through
lm-eval's evaluator.

The rules the responses are written against are those of lm-eval 0.4.13's
`lm_eval/tasks/ifeval/instructions.py` (e.g. bullets are lines starting with "* " or "-",
paragraphs are split on "***", the end phrase may be followed by a closing quote).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IFEVAL_FILE = DATA / "ifeval" / "input_data.jsonl"

pytestmark = pytest.mark.skipif(
    not IFEVAL_FILE.is_file(), reason=f"needs {DATA}/ifeval/input_data.jsonl (the shared data folder)"
)


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> dict[int, dict]:
    from medmerge.evaluation.data import load_ifeval

    return {doc["key"]: doc for doc in load_ifeval(DATA)}


@pytest.fixture(scope="module", autouse=True)
def deterministic_langdetect():
    """langdetect samples at random unless seeded; the language and case checkers use it."""
    from langdetect import DetectorFactory

    before = DetectorFactory.seed
    DetectorFactory.seed = 0
    yield
    DetectorFactory.seed = before


def medmerge_verdicts(doc: dict, response: str) -> dict:
    from medmerge.evaluation import hooks

    return hooks.ifeval_process_results(doc, [response])


def lm_eval_checker(doc: dict, index: int = 0):
    """lm-eval's checker for one instruction of a doc, built the way lm-eval's utils builds it."""
    from medmerge.evaluation import nltk_data

    nltk_data.ensure_punkt()  # before lm-eval's IFEval modules look for punkt_tab
    from lm_eval.tasks.ifeval import instructions_registry

    instruction_id = doc["instruction_id_list"][index]
    checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    checker.build_description(**{k: v for k, v in doc["kwargs"][index].items() if v})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=doc["prompt"])
    return checker


def single_instruction_doc(docs: dict[int, dict], key: int, instruction_id: str, kwargs: dict) -> dict:
    doc = docs[key]
    # Every one of the 25 types has at least one real prompt carrying only that instruction,
    # so no doc is cut down to one instruction here: the prompt is used exactly as in the file.
    assert doc["instruction_id_list"] == [instruction_id], f"key {key} is not a single-{instruction_id} prompt"
    assert {k: v for k, v in doc["kwargs"][0].items() if v} == kwargs, f"key {key}: kwargs changed in the data file"
    return doc


def n_words(n: int) -> str:
    """A single-line blog text of exactly n words (as lm-eval counts them: runs of \\w)."""
    words = "we wandered through quiet temples and busy markets in kyoto before the night train".split()
    return " ".join(islice(cycle(words), n)).capitalize() + "."


# --- 1. one prompt per instruction type: follow / violate --------------------------------------


@dataclass(frozen=True)
class Case:
    instruction_id: str
    key: int  # a real prompt in input_data.jsonl with this single instruction
    kwargs: dict  # its non-empty kwargs, as in the file
    follow: str
    violate: str
    violate_loose: bool = False  # loose verdict for `violate` (loose drops first/last line and '*')


REPEAT_1480 = "Write a blog post about the most interesting things you have seen or ridden on public transportation."

CASES = [
    Case(
        "change_case:capital_word_frequency", 1592, {"capital_relation": "at least", "capital_frequency": 3},
        # exactly 3 all-capital tokens (FULLY, MORE, JOBS); digits are not upper case
        "Researchers at Stanford and Berkeley found that the country could run FULLY on renewable power "
        "by 2050 with MORE solar and wind farms, which would also create JOBS.",
        "Researchers at Stanford and Berkeley found that the country could run FULLY on renewable power "
        "by 2050 with MORE solar and wind farms, which would also create jobs.",
    ),
    Case(
        "change_case:english_capital", 1566, {},
        "I REGRET THE SUMMER WE LET SLIP AWAY, AND I STILL HEAR YOUR VOICE IN EVERY EMPTY ROOM.\n"
        "THIS VERSE SHOWS HOW REGRET LINGERS LONG AFTER A LOVE STORY ENDS, SO THE SINGER KEEPS LOOKING BACK.",
        "I regret the summer we let slip away, and I still hear your voice in every empty room.\n"
        "This verse shows how regret lingers long after a love story ends, so the singer keeps looking back.",
    ),
    Case(
        "change_case:english_lowercase", 1019, {},
        "what are the two young boys with toy guns and horns getting ready to celebrate at the parade today?",
        "What are the two young boys with toy guns and horns getting ready to celebrate at the parade today?",
    ),
    Case(
        "combination:repeat_prompt", 1480, {"prompt_to_repeat": REPEAT_1480},
        REPEAT_1480 + "\n\nOnce, on a night bus in Lisbon, I sat next to a man commuting with a live goose.",
        # a paraphrase of the request is not a word-for-word repetition
        "Write a blog post about the most interesting things I have seen on public transport.\n"
        "Once, on a night bus in Lisbon, I sat next to a man commuting with a live goose.",
    ),
    Case(
        "combination:two_responses", 1098, {},
        'People often call God "the Almighty".\n******\nMany people call God "the Creator".',
        # two responses, but the same one twice
        'People often call God "the Almighty".\n******\nPeople often call God "the Almighty".',
    ),
    Case(
        "detectable_content:number_placeholders", 1372, {"num_placeholders": 7},
        "Visiting [aquarium name] in [city] on [date] was a delight. We met [guide name] at [entrance], "
        "watched the [exhibit] and paid [price] for the tickets.",
        "Visiting [aquarium name] in [city] on [date] was a delight. We met [guide name] at [entrance], "
        "watched the [exhibit] and paid twenty dollars for the tickets.",
    ),
    Case(
        "detectable_content:postscript", 1246, {"postscript_marker": "P.P.S"},
        "Soft as a cloud and bright as the sun,\n[Product name] is made for everyone.\n\n"
        "P.P.S. Replace [Product name] with the name of your own product.",
        "Soft as a cloud and bright as the sun,\n[Product name] is made for everyone.\n\n"
        "P.S. Replace [Product name] with the name of your own product.",
    ),
    Case(
        "detectable_format:constrained_response", 227, {},
        "My answer is no. A standard poodle is usually smaller than a golden retriever.",
        "No. A standard poodle is usually smaller than a golden retriever.",
    ),
    Case(
        "detectable_format:json_format", 1075, {},
        '```json\n{"product": "CloudSoft Diapers", "headline": "Comfort that lasts all night", '
        '"features": ["breathable", "stretchy waistband"]}\n```',
        "Introducing CloudSoft Diapers: comfort that lasts all night, with a breathable stretchy waistband!",
    ),
    Case(
        "detectable_format:multiple_sections", 1131, {"section_spliter": "Section", "num_sections": 4},
        "Section 1: Contact\nPhil Larkin, professional clown.\nSection 2: Experience\nTen years of birthday "
        "parties.\nSection 3: Skills\nJuggling and balloon animals.\nSection 4: References\nOn request.",
        # only 3 of the 4 sections
        "Section 1: Contact\nPhil Larkin, professional clown.\nSection 2: Experience\nTen years of birthday "
        "parties.\nSection 3: Skills\nJuggling and balloon animals.\nReferences on request.",
    ),
    Case(
        "detectable_format:number_bullet_lists", 102, {"num_bullets": 3},
        "Here is the dialogue:\n* Ava: Do I look too fancy in this gown?\n* Ben: You look great, and I am "
        "comfortable in my sweats.\n* Ava: Then let us go to the gala as we are.\nThe end.",
        # 4 bullets; loose cannot reach 3 (dropping the outer lines keeps 4, dropping '*' leaves 0)
        "Here is the dialogue:\n* Ava: Do I look too fancy in this gown?\n* Ben: You look great, and I am "
        "comfortable in my sweats.\n* Ava: Then let us go to the gala as we are.\n* Ben: Lead the way.\n"
        "The end.",
    ),
    Case(
        "detectable_format:number_highlighted_sections", 1644, {"num_highlights": 5},
        "Dear *Bean There Cafe*, I write to you in rhyme,\nWith *three years of latte art* to my name,\n"
        "I am *always on time* and *kind to each guest*,\nSo please *hire me* and I will give you my best.",
        "Dear *Bean There Cafe*, I write to you in rhyme,\nWith *three years of latte art* to my name,\n"
        "I am *always on time* and *kind to each guest*,\nSo please hire me and I will give you my best.",
    ),
    Case(
        "detectable_format:title", 1322, {},
        "<<Kotlin vs Java>>\nKotlin is concise and null-safe; Java has the larger ecosystem.",
        "# Kotlin vs Java\nKotlin is concise and null-safe; Java has the larger ecosystem.",
    ),
    Case(
        "keywords:existence", 1531, {"keywords": ["atlantis", "constable"]},
        "<h1>Project Atlantis</h1><p>A local constable and a team of researchers will map the barriers "
        "that people with disabilities meet every day.</p>",
        "<h1>Project Atlantis</h1><p>A local officer and a team of researchers will map the barriers "
        "that people with disabilities meet every day.</p>",
    ),
    Case(
        "keywords:forbidden_words", 1147, {"forbidden_words": ["field", "thanks", "issue", "collaborator"]},
        "My fellow Americans: we have delivered a fix for the problem observed with our single sign-on "
        "system. We are working closely with our partners, and we will finish the job.",
        "My fellow Americans: we have delivered a fix for the issue observed with our single sign-on "
        "system. We are working closely with our partners, and we will finish the job.",
    ),
    Case(
        "keywords:frequency", 1393, {"relation": "at least", "keyword": "synonyms", "frequency": 3},
        "Pro: synonyms give writers variety. Con: synonyms can confuse readers, who may think the "
        "synonyms name different things.",
        "Pro: synonyms give writers variety. Con: synonyms can confuse readers, who may think the "
        "two words name different things.",
    ),
    Case(
        "keywords:letter_frequency", 2265, {"let_relation": "at least", "letter": "q", "let_frequency": 4},
        "Yo the president spits quick quips with quiet quality in every bar.",  # q: quick quips quiet quality
        "Yo the president spits quick quips with quiet style in every bar.",  # 3 q only
    ),
    Case(
        "language:response_language", 3682, {"language": "de"},
        "Die fünf großen Technologiekonzerne geben jedes Jahr viele Millionen Dollar für Lobbyarbeit in "
        "Washington aus, wobei Amazon und Meta zu den größten Ausgebern gehören.",
        "The five big technology companies spend many millions of dollars on lobbying in Washington "
        "every year, with Amazon and Meta among the biggest spenders.",
    ),
    Case(
        "length_constraints:nth_paragraph_first_word", 181,
        {"first_word": "president", "num_paragraphs": 6, "nth_paragraph": 2},
        "BREAKING: Aliens have invaded Earth, and they mostly want our snacks.\n\n"
        "President Smith greeted the visitors with a firm handshake and a bag of chips.\n\n"
        "The aliens then asked to speak to the manager.\n\n"
        "Scientists say the invaders are roughly the size of a golden retriever.\n\n"
        "Local cats have declared themselves ambassadors.\n\n"
        "More updates will follow once the aliens finish their nap.",
        "BREAKING: Aliens have invaded Earth, and they mostly want our snacks.\n\n"
        "The President greeted the visitors with a firm handshake and a bag of chips.\n\n"
        "The aliens then asked to speak to the manager.\n\n"
        "Scientists say the invaders are roughly the size of a golden retriever.\n\n"
        "Local cats have declared themselves ambassadors.\n\n"
        "More updates will follow once the aliens finish their nap.",
    ),
    Case(
        "length_constraints:number_paragraphs", 1082, {"num_paragraphs": 2},
        "Max woke up and saw a health bar floating over his head.\nHe was inside a video game.\n***\n"
        "He decided to play well, collected every coin\nand finally found the exit.",
        # 3 paragraphs, each of two lines, so dropping a first or last line still leaves 3
        "Max woke up and saw a health bar floating over his head.\nHe was inside a video game.\n***\n"
        "He decided to play well\nand collected every coin.\n***\nIn the end he found the exit\n"
        "and woke up for real.",
    ),
    Case(
        "length_constraints:number_sentences", 1268, {"relation": "less than", "num_sentences": 6},
        "Dear diary. Work was hectic today. I took a short walk at lunch. Then I wrote down three worries. "
        "I feel calmer now.",
        "Dear diary. Work was hectic today. I took a short walk at lunch. Then I wrote down three worries. "
        "I feel calmer now. I came up with this example by thinking about my own week.",
    ),
    Case(
        "length_constraints:number_words", 1092, {"relation": "less than", "num_words": 300},
        n_words(299),  # the boundary: 299 < 300
        n_words(300),
    ),
    Case(
        "punctuation:no_comma", 1001, {},
        "Hark! Upon the first morn thou shalt break thy fast in Tokyo.\n"
        "On the second day journey unto Kyoto where golden temples await thee.",
        "Hark! Upon the first morn, thou shalt break thy fast in Tokyo.\n"
        "On the second day, journey unto Kyoto.\nFare thee well good traveller.",
    ),
    Case(
        "startend:end_checker", 1128, {"end_phrase": "Is there anything else I can help with?"},
        "The sentiment is negative. Is there anything else I can help with?",
        "The sentiment is negative. Let me know if you need anything else.",
    ),
    Case(
        "startend:quotation", 122, {},
        '"The internet began as ARPANET in 1969, and today it connects billions of teenagers."',
        "The internet began as ARPANET in 1969, and today it connects billions of teenagers.",
    ),
]


def test_the_data_has_exactly_the_25_instruction_types_of_the_table(docs):
    present = {iid for doc in docs.values() for iid in doc["instruction_id_list"]}
    assert len(docs) == 541
    assert len(present) == 25
    assert sorted(present) == sorted(case.instruction_id for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.instruction_id for case in CASES])
@pytest.mark.parametrize("follows", [True, False], ids=["follow", "violate"])
def test_verdict_matches_hand_and_lm_eval_checker(docs, case: Case, follows: bool):
    doc = single_instruction_doc(docs, case.key, case.instruction_id, case.kwargs)
    response = case.follow if follows else case.violate

    ours = medmerge_verdicts(doc, response)
    assert ours["prompt_level_strict_acc"] is follows
    assert ours["inst_level_strict_acc"] == [follows]
    assert lm_eval_checker(doc).check_following(response) is follows

    loose = True if follows else case.violate_loose
    assert ours["prompt_level_loose_acc"] is loose
    assert ours["inst_level_loose_acc"] == [loose]


# Responses that fail the strict check but pass the loose one (lm-eval's loose mode also tries the
# response without its first line, without its last line, without both, and with every '*' removed).
LOOSE_ONLY = [
    ("punctuation:no_comma", 1001,
     "Sure, here is thy itinerary:\nOn the first morn thou shalt see Tokyo and on the second Kyoto."),
    ("change_case:english_lowercase", 1019,
     "Sure! Here is a question:\nwhat are the two young boys with toy guns and horns getting ready to celebrate?"),
    ("startend:quotation", 122,
     'Here is the blog post:\n"The internet began as ARPANET in 1969, and today it connects billions of teenagers."'),
    ("detectable_format:json_format", 1075,
     'Here is the advertisement in JSON:\n{"product": "CloudSoft Diapers", "headline": "Comfort all night"}'),
    ("startend:end_checker", 1128,
     "The sentiment is negative. Is there anything else I can help with?\nHave a nice day"),
    ("combination:repeat_prompt", 1480, "Sure!\n" + REPEAT_1480 + "\nI once saw a goose on a night bus."),
    ("keywords:forbidden_words", 1147,
     "Thanks for the request.\nMy fellow Americans: we have delivered a fix for the problem with single sign-on."),
    # markdown bold: the first word is "**President**" until loose mode removes the asterisks
    ("length_constraints:nth_paragraph_first_word", 181,
     "Aliens have landed.\n\n**President** Smith offered them chips.\n\nThe aliens asked for the manager.\n\n"
     "Cats are now ambassadors.\n\nScientists are puzzled.\n\nMore news after the nap."),
    # 4 bullets where 3 are asked for: dropping the first line (a bullet) leaves exactly 3
    ("detectable_format:number_bullet_lists", 102,
     "* Ava: Do I look too fancy?\n* Ben: You look great.\n* Ava: Your sweats look comfy.\n* Ben: Let us go."),
]


@pytest.mark.parametrize("instruction_id, key, response", LOOSE_ONLY, ids=[row[0] for row in LOOSE_ONLY])
def test_loose_mode_accepts_what_strict_rejects(docs, instruction_id, key, response):
    doc = docs[key]
    assert doc["instruction_id_list"] == [instruction_id]
    ours = medmerge_verdicts(doc, response)
    assert lm_eval_checker(doc).check_following(response) is False
    assert (ours["prompt_level_strict_acc"], ours["inst_level_strict_acc"]) == (False, [False])
    assert (ours["prompt_level_loose_acc"], ours["inst_level_loose_acc"]) == (True, [True])


# Where lm-eval's rule is not what a reader of the prompt would expect; the verdict is lm-eval's rule.
QUIRKS = [
    # \bcollaborator\b does not match the plural
    ("keywords:forbidden_words", 1147, "We are working closely with our collaborators.", True),
    # the section splitter is case-sensitive: SECTION 1..4 are no "Section" sections
    ("detectable_format:multiple_sections", 1131, "SECTION 1 Contact\nSECTION 2 Experience\nSECTION 3 Skills\n"
     "SECTION 4 References", False),
    # lines starting with "-" count as bullets too
    ("detectable_format:number_bullet_lists", 102, "- Ava: Ready?\n- Ben: Ready.\n- Ava: Let us go.", True),
    # a closing double quote after the end phrase is stripped before the comparison
    ("startend:end_checker", 1128, 'The sentiment is negative. "Is there anything else I can help with?"', True),
    # the pronoun "I" is an all-capital word
    ("change_case:capital_word_frequency", 1592, "I think I know what I mean.", True),
    # no letters at all: langdetect raises, and lm-eval counts the instruction as followed
    ("language:response_language", 3682, "2022: 100%", True),
]


@pytest.mark.parametrize("instruction_id, key, response, verdict", QUIRKS, ids=[row[0] for row in QUIRKS])
def test_checker_quirks(docs, instruction_id, key, response, verdict):
    doc = docs[key]
    assert doc["instruction_id_list"] == [instruction_id]
    assert lm_eval_checker(doc).check_following(response) is verdict
    assert medmerge_verdicts(doc, response)["inst_level_strict_acc"] == [verdict]


# --- 2. the four aggregate metrics on a small set ----------------------------------------------

# key -> (response, strict per-instruction verdicts, loose per-instruction verdicts), by hand.
AGGREGATE_SET = {
    # no_comma, number_highlighted_sections >= 3, existence of brilliant / le / hou: all followed
    1348: (
        "Brilliant Le Hou was born in Hanoi in 1970.\n*Early life*: she studied physics in a small school.\n"
        "*Career*: she built solar lamps for rural villages.\n*Legacy*: her designs still light many homes.",
        [True, True, True],
        [True, True, True],
    ),
    # no_comma, two_responses: the only comma is on the first line, which loose mode drops
    1107: (
        "Sure, here are two jokes:\nWhy did the rocket break up with the moon? It needed space.\n******\n"
        "What is a rocket's favourite meal? Launch.",
        [False, True],
        [True, True],
    ),
    # english_lowercase, quotation: quoted but capitalised, on one line (loose cannot help)
    1843: ('"Azure Shore Estates"', [False, True], [False, True]),
    # number_bullet_lists == 4, no_comma: 4 bullets, the only comma is on the last line
    2380: (
        "* A team of web developers who build for busy moms\n* Award winning people with a proven record\n"
        "* Writing that speaks to families\n* Graphic design that catches the eye\nHope this helps, moms!",
        [True, False],
        [True, True],
    ),
}

# By hand: strict, prompts fully followed 1 of 4, instructions 3+1+1+1 = 6 of 9;
#          loose,  prompts fully followed 3 of 4, instructions 3+2+1+2 = 8 of 9.
EXPECTED = {
    "prompt_level_strict_acc": 1 / 4,
    "inst_level_strict_acc": 6 / 9,
    "prompt_level_loose_acc": 3 / 4,
    "inst_level_loose_acc": 8 / 9,
}


def test_aggregate_metrics_equal_hand_computation(docs):
    from medmerge.evaluation import hooks

    per_doc = {}
    for key, (response, strict, loose) in AGGREGATE_SET.items():
        out = medmerge_verdicts(docs[key], response)
        assert out["inst_level_strict_acc"] == strict, key
        assert out["inst_level_loose_acc"] == loose, key
        assert out["prompt_level_strict_acc"] is all(strict), key
        assert out["prompt_level_loose_acc"] is all(loose), key
        per_doc[key] = out

    got = {}
    for metric in EXPECTED:
        items = [out[metric] for out in per_doc.values()]
        got[metric] = hooks.agg_inst_level_acc(items) if metric.startswith("inst") else sum(items) / len(items)
    assert got == pytest.approx(EXPECTED)


def test_aggregate_metrics_through_lm_eval_evaluator(docs):
    """The same four numbers from lm-eval's simple_evaluate on mm_ifeval, with canned generations."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from medmerge.evaluation import registry

    by_prompt = {docs[key]["prompt"]: response for key, (response, _, _) in AGGREGATE_SET.items()}

    class Canned(LM):
        def generate_until(self, requests):
            return [by_prompt[request.args[0]] for request in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    order = list(docs)  # the task's test split is the file in file order
    indices = [order.index(key) for key in AGGREGATE_SET]
    manager = TaskManager(include_path=str(registry.TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA)})
    out = simple_evaluate(
        model=Canned(), tasks=["mm_ifeval"], task_manager=manager, samples={"mm_ifeval": indices},
        bootstrap_iters=0, log_samples=False,
    )
    results = out["results"]["mm_ifeval"]
    assert results["sample_len"] == len(AGGREGATE_SET)
    assert {metric: results[f"{metric},none"] for metric in EXPECTED} == pytest.approx(EXPECTED)
