"""What medmerge's lm-eval tasks call: dataset loaders, prompts, per-sample metrics, aggregations."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

from . import data, metrics, nltk_data


def as_dataset(docs: list[dict], extra_splits: dict[str, list[dict]] | None = None):
    import datasets  # deferred: lm-eval has imported it by the time a task's dataset is built

    splits = {"test": datasets.Dataset.from_list(docs)}
    for name, rows in (extra_splits or {}).items():
        splits[name] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def _loader(load: Callable[..., list[dict]]):
    def dataset(**kwargs):
        return as_dataset(load(kwargs.get("data_dir"), kwargs.get("file")))

    dataset.__name__ = load.__name__.replace("load_", "") + "_dataset"
    return dataset


ifeval_dataset = _loader(data.load_ifeval)
mts_dialog_dataset = _loader(data.load_mts_dialog)
meqsum_dataset = _loader(data.load_meqsum)
pubmedqa_dataset = _loader(data.load_pubmedqa)
medqa_dataset = _loader(data.load_medqa)
medmcqa_dataset = _loader(data.load_medmcqa)


def mmlu_dataset(subject: str, data_dir=None, **_):
    test = data.load_mmlu(subject, data_dir, "test")
    dev_file = data.locate("mmlu", data_dir).parent / "dev" / f"{subject}_dev.csv"
    return as_dataset(test, {"dev": data.load_mmlu(subject, data_dir, "dev")} if dev_file.is_file() else None)


# --- prompts ---------------------------------------------------------------------------------


def mts_dialog_prompt(doc: dict) -> str:
    section = doc["section_name"]
    return (
        f"Summarize the following doctor-patient conversation as the {section} section of a clinical note.\n\n"
        f"Conversation:\n{doc['dialogue'].strip()}\n\n{section[0].upper()}{section[1:]} section:"
    )


def pubmedqa_prompt(doc: dict) -> str:
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(doc["CONTEXTS"]), doc["QUESTION"])


def _options(doc: dict) -> str:
    return "".join(f"{k}. {doc['options'][k]}\n" for k in "ABCD")


def medqa_prompt(doc: dict) -> str:
    return f"Question: {doc['question']}\n{_options(doc)}Answer:"


def medmcqa_prompt(doc: dict) -> str:
    return f"Question: {doc['question']}\nChoices:\n{_options(doc)}Answer:"


# --- IFEval: lm-eval's own checkers ----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def ifeval_utils():
    """lm_eval.tasks.ifeval.utils, after NLTK's punkt_tab is found offline (lm-eval would download it at import).

    Deferred on purpose: nltk and lm-eval take seconds to import, and only IFEval-graded tasks need them.
    """
    import nltk  # noqa: F401  (so that ensure_punkt puts our folder first on its path)

    nltk_data.ensure_punkt()  # found or written offline, before lm-eval's module would try to download it
    from lm_eval.tasks.ifeval import utils

    return utils


def ifeval_process_results(doc: dict, results: Sequence[str]) -> dict:
    return ifeval_utils().process_results(doc, results)


def agg_inst_level_acc(items):
    return ifeval_utils().agg_inst_level_acc(items)


# --- clinical generation -----------------------------------------------------------------------


def generation_results(doc: dict, results: Sequence[str], *, target: str,
                       groups: Sequence[str] = metrics.DEFAULT_METRICS) -> dict:
    """Per-sample ROUGE and METEOR; BLEU and the composite are corpus-level, so their items carry the pair.

    The composite's item also carries this sample's ROUGE and METEOR, so the
    aggregation averages them instead of scoring every sample a second time.
    METEOR (and so the composite) is left out when WordNet is missing: lm-eval then
    reports no value, and medmerge's results.json says why.
    """
    prediction, reference = results[0].strip(), str(doc[target]).strip()
    groups = tuple(groups)
    parts: dict = {}
    if "rouge" in groups:
        parts.update(metrics.rouge(prediction, reference))
    meteor_ok = "meteor" not in groups or metrics.meteor_status().available
    if "meteor" in groups and meteor_ok:
        parts["meteor"] = metrics.meteor(prediction, reference)
    out: dict = dict(parts)
    if "bleu" in groups:
        out["bleu"] = (prediction, reference)
    if meteor_ok:
        out["composite"] = (prediction, reference, "bleu" in groups, parts)
    return out


mts_dialog_results = functools.partial(generation_results, target="section_text")
meqsum_results = functools.partial(generation_results, target="summary")


def agg_bleu(items) -> float:
    predictions, references = zip(*items)
    return metrics.corpus_bleu(predictions, references)


def agg_composite(items) -> float:
    """Mean of the task's corpus scores: per-sample means of ROUGE/METEOR, corpus BLEU."""
    predictions, references, with_bleu, parts = zip(*items)
    scores = {k: metrics.mean([p[k] for p in parts]) for k in parts[0]}
    if with_bleu[0]:
        scores["bleu"] = metrics.corpus_bleu(predictions, references)
    return metrics.composite(scores)


def sample_value(name: str, value):
    """A corpus-level item as a per-sample number for sample logs (sentence BLEU, per-sample composite)."""
    if name == "bleu" and isinstance(value, (tuple, list)) and len(value) == 2:
        return metrics.sentence_bleu(*value)
    if name == "composite" and isinstance(value, (tuple, list)) and len(value) == 4:
        prediction, reference, with_bleu, parts = value
        if with_bleu:
            parts = {**parts, "bleu": metrics.sentence_bleu(prediction, reference)}
        return metrics.composite(parts)
    return value
