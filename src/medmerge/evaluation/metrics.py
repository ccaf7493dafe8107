"""Clinical-generation metrics, each a thin call into the reference library.

All are reported on a 0-100 scale (as papers print them):
- ROUGE-1/2/L: rouge-score's `RougeScorer(use_stemmer=True)` F-measure, averaged over samples.
- BLEU: sacrebleu's corpus BLEU-4 (`corpus_bleu(predictions, [references])`: 13a tokenisation,
  exponential smoothing, brevity penalty over the whole corpus).
- METEOR: nltk's `meteor_score([reference_tokens], prediction_tokens)` (alpha 0.9, beta 3, gamma 0.5,
  WordNet synonyms) on `nltk.word_tokenize` tokens, averaged over samples. Needs WordNet: without it
  METEOR is *unavailable* (reported with the reason), never 0.
- composite: the plain mean of the task's metrics above, i.e. by default
  (ROUGE-1 + ROUGE-2 + ROUGE-L + BLEU + METEOR) / 5. Unavailable when one of its parts is.

Each reference library is imported on first use, on purpose: nltk alone takes 1.5 s to
import, and most evaluations use one or two of the three.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

from . import nltk_data

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRIC_GROUPS = {"rouge": ROUGE_TYPES, "bleu": ("bleu",), "meteor": ("meteor",)}
DEFAULT_METRICS = ("rouge", "bleu", "meteor")


class Unavailable(Exception):
    """A metric cannot be computed here (e.g. WordNet missing); carries the reason."""


def expand(groups: Iterable[str]) -> tuple[str, ...]:
    """['rouge', 'bleu'] -> ('rouge1', 'rouge2', 'rougeL', 'bleu')."""
    out: list[str] = []
    for g in groups:
        if g not in METRIC_GROUPS:
            raise ValueError(f"unknown metric {g!r}; choose from {', '.join(METRIC_GROUPS)}")
        out += METRIC_GROUPS[g]
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """F-measure x 100 for ROUGE-1, ROUGE-2 and ROUGE-L of one pair."""
    scores = _rouge_scorer().score(reference, prediction)
    return {k: scores[k].fmeasure * 100 for k in ROUGE_TYPES}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def sentence_bleu(prediction: str, reference: str) -> float:
    """Per-sample BLEU for sample logs only; the task's BLEU is the corpus BLEU."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score


def meteor_status() -> nltk_data.Availability:
    nltk_data.activate()
    return nltk_data.wordnet_status()


def meteor(prediction: str, reference: str) -> float:
    status = meteor_status()
    if not status.available:
        raise Unavailable(status.reason)
    import nltk
    from nltk.translate.meteor_score import meteor_score

    nltk_data.ensure_punkt()  # word_tokenize reads punkt_tab; now that nltk is imported our folder goes first

    return meteor_score([nltk.word_tokenize(reference)], nltk.word_tokenize(prediction)) * 100


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def corpus_scores(predictions: Sequence[str], references: Sequence[str],
                  metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Corpus-level scores of the chosen metric groups plus `composite`; raises Unavailable for METEOR without WordNet."""
    names = expand(metrics)
    out: dict[str, float] = {}
    if "rouge1" in names:
        per = [rouge(p, r) for p, r in zip(predictions, references)]
        for k in ROUGE_TYPES:
            out[k] = mean([s[k] for s in per])
    if "bleu" in names:
        out["bleu"] = corpus_bleu(predictions, references)
    if "meteor" in names:
        out["meteor"] = mean([meteor(p, r) for p, r in zip(predictions, references)])
    out["composite"] = composite(out)
    return out


def composite(scores: dict[str, float]) -> float:
    parts = [v for k, v in scores.items() if k != "composite"]
    return mean(parts)
