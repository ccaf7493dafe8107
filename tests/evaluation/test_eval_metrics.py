"""medmerge's clinical-generation metrics against the reference libraries called directly.

The issue's check: on MTS-Dialog references against a simple baseline prediction,
medmerge's ROUGE, BLEU and METEOR equal rouge-score, sacrebleu and nltk. The
expected numbers below are computed here with those libraries (never through
medmerge.evaluation.metrics), using the definitions in metrics.py's docstring:

- ROUGE-1/2/L: RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True) F-measure, mean over samples, x100
- BLEU: sacrebleu.corpus_bleu(predictions, [references]).score
- METEOR: nltk meteor_score([word_tokenize(ref)], word_tokenize(pred)), mean over samples, x100
- composite: the mean of those five.

Baseline prediction: the dialogue's first turn (its first line), with the speaker
prefix ("Doctor:", "Patient:", "Guest_clinician:", ...) removed. A whole turn rather
than a Punkt sentence keeps the baseline independent of the tokenizer under test,
and it usually shares some words with the note, so no metric is trivially 0.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from medmerge.evaluation import data, hooks, metrics, nltk_data

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_mts = pytest.mark.skipif(
    not (DATA / "mts_dialog").is_dir(), reason=f"needs {DATA}/mts_dialog (the shared data folder)"
)

REL = 1e-9
FIVE = ("rouge1", "rouge2", "rougeL", "bleu", "meteor")
SPEAKER = re.compile(r"^\W*[A-Za-z_]+\s*:\s*")  # 'Doctor: ', 'Guest_clinician: ', '"Doctor: '


def baseline(dialogue: str) -> str:
    first_turn = dialogue.strip().splitlines()[0]
    return SPEAKER.sub("", first_turn, count=1).strip()


def _wordnet_via_nltk() -> bool:
    import nltk

    nltk_data.activate()
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return False
    return True


# --- the reference libraries, called directly ------------------------------------------------------


def reference_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    import nltk
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = [scorer.score(r, p) for p, r in zip(preds, refs)]  # score(target, prediction)
    out = {k: 100 * sum(s[k].fmeasure for s in per) / len(per) for k in ("rouge1", "rouge2", "rougeL")}
    out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
    met = [meteor_score([nltk.word_tokenize(r)], nltk.word_tokenize(p)) for p, r in zip(preds, refs)]
    out["meteor"] = 100 * sum(met) / len(met)
    out["composite"] = sum(out[k] for k in FIVE) / 5
    return out


@pytest.fixture(scope="module")
def mts():
    docs = data.load_mts_dialog(DATA)
    preds = [baseline(d["dialogue"]) for d in docs]
    refs = [d["section_text"].strip() for d in docs]
    return docs, preds, refs


@pytest.fixture(scope="module")
def expected(mts):
    if not _wordnet_via_nltk():
        pytest.skip("nltk finds no WordNet (METEOR's reference value needs it): run `medmerge setup-nltk`")
    _, preds, refs = mts
    return reference_scores(preds, refs)


# --- 1. corpus scores on MTS-Dialog ----------------------------------------------------------------


@needs_mts
def test_baseline_is_what_the_docstring_says(mts):
    docs, preds, refs = mts
    assert len(docs) == 200  # MTS-Dialog test set 1
    assert all(preds) and all(refs)
    assert not any(p.startswith(("Doctor:", "Patient:", "Guest_")) for p in preds)
    # first doc: 'Doctor: Good afternoon, sir. Did you just have a birthday? ...'
    assert preds[0].startswith("Good afternoon, sir. Did you just have a birthday?")


@needs_mts
def test_corpus_scores_equal_reference_libraries(mts, expected):
    _, preds, refs = mts
    assert metrics.meteor_status().available, metrics.meteor_status().reason
    got = metrics.corpus_scores(preds, refs)
    assert set(got) == {*FIVE, "composite"}
    for k in (*FIVE, "composite"):
        assert got[k] == pytest.approx(expected[k], rel=REL), k
    # a baseline that shares words with the notes: every metric is a real, non-zero number
    assert all(0 < expected[k] < 100 for k in FIVE), expected
    assert got["composite"] == pytest.approx(sum(got[k] for k in FIVE) / 5, rel=REL)


@needs_mts
def test_lm_eval_path_equals_reference_libraries(mts, expected):
    """Per-doc process_results, then the YAML's aggregations (lm-eval's 'mean', agg_bleu, agg_composite)."""
    from lm_eval.api.registry import get_aggregation

    lm_mean = get_aggregation("mean")
    docs, preds, _ = mts
    per_doc = [hooks.generation_results(doc, [pred], target="section_text") for doc, pred in zip(docs, preds)]
    assert all(set(r) == {*FIVE, "composite"} for r in per_doc)
    assert hooks.mts_dialog_results(docs[0], [preds[0]]) == per_doc[0]  # what the task YAML calls

    got = {k: lm_mean([r[k] for r in per_doc]) for k in ("rouge1", "rouge2", "rougeL", "meteor")}
    got["bleu"] = hooks.agg_bleu([r["bleu"] for r in per_doc])
    got["composite"] = hooks.agg_composite([r["composite"] for r in per_doc])
    for k in (*FIVE, "composite"):
        assert got[k] == pytest.approx(expected[k], rel=REL), k
    assert got["composite"] == pytest.approx(sum(got[k] for k in FIVE) / 5, rel=REL)


# --- 2. per-sample logs ----------------------------------------------------------------------------


@needs_mts
def test_sample_value_bleu_is_sentence_bleu(mts):
    import sacrebleu

    docs, preds, refs = mts
    values = []
    for doc, pred, ref in zip(docs, preds, refs):
        item = hooks.generation_results(doc, [pred], target="section_text", groups=("bleu",))["bleu"]
        value = hooks.sample_value("bleu", item)
        assert value == pytest.approx(sacrebleu.sentence_bleu(pred, [ref]).score, rel=REL)
        values.append(value)
    assert any(v > 0 for v in values)  # not a corpus of zeros
    # a per-sample BLEU is not the corpus BLEU, so the two must not be confused
    assert sum(values) / len(values) != pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, rel=1e-3)


@needs_mts
def test_sample_value_composite_is_per_sample_mean(mts, expected):
    import nltk
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    docs, preds, refs = mts
    for doc, pred, ref in list(zip(docs, preds, refs))[:20]:
        r = scorer.score(ref, pred)
        parts = [100 * r[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")]
        parts.append(sacrebleu.sentence_bleu(pred, [ref]).score)
        parts.append(100 * meteor_score([nltk.word_tokenize(ref)], nltk.word_tokenize(pred)))
        item = hooks.generation_results(doc, [pred], target="section_text")["composite"]
        assert hooks.sample_value("composite", item) == pytest.approx(sum(parts) / 5, rel=REL)
    assert hooks.sample_value("rouge1", 12.5) == 12.5  # per-sample numbers pass through


# --- 3. hand-computed, 0-100 scale -----------------------------------------------------------------


def test_rouge_by_hand():
    # prediction 'the cat sat', reference 'the cat sat on the mat' (all words <= 3 letters: the stemmer keeps them)
    # ROUGE-1: overlap {the, cat, sat} = 3; P = 3/3 = 1, R = 3/6 = 0.5, F = 2*1*0.5/(1+0.5) = 2/3 -> 66.67
    # ROUGE-2: pred bigrams {the cat, cat sat}, ref has 5 bigrams, both match; P = 1, R = 2/5, F = 0.8/1.4 = 4/7 -> 57.14
    # ROUGE-L: LCS 'the cat sat' = 3; P = 1, R = 0.5, F = 2/3 -> 66.67
    got = metrics.rouge("the cat sat", "the cat sat on the mat")
    assert got["rouge1"] == pytest.approx(200 / 3, rel=REL)
    assert got["rouge2"] == pytest.approx(400 / 7, rel=REL)
    assert got["rougeL"] == pytest.approx(200 / 3, rel=REL)
    # stemming: 'coughing' and 'coughs' both stem to 'cough' -> identical unigrams, F = 1 -> 100
    assert metrics.rouge("coughing", "coughs")["rouge1"] == pytest.approx(100.0, rel=REL)
    # BLEU on the same scale: an exact 6-word match is 100, no shared word is 0
    assert metrics.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert metrics.corpus_bleu(["dog"], ["the cat sat on the mat"]) == 0.0


# --- 4. METEOR unavailable -------------------------------------------------------------------------


@pytest.fixture
def no_wordnet(tmp_path, monkeypatch):
    """medmerge's NLTK folder is an empty one; nltk's path and NLTK_DATA are restored afterwards."""
    import nltk

    empty = tmp_path / "nltk_empty"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.setenv("NLTK_DATA", "")
    monkeypatch.setenv("MEDMERGE_NLTK_DATA", str(empty))
    return empty


DOCS = [
    {"section_text": "Patient reports a dry cough for three days.", "dialogue": "x"},
    {"section_text": "No known drug allergies.", "dialogue": "x"},
]
PREDS = ["Dry cough for three days.", "No allergies."]


@pytest.mark.parametrize("how", ["env", "patched"])
def test_meteor_unavailable_is_absent_not_zero(no_wordnet, monkeypatch, how):
    if how == "patched":
        monkeypatch.setattr(metrics, "meteor_status",
                            lambda: nltk_data.Availability(False, "WordNet missing; run `medmerge setup-nltk`"))
    status = metrics.meteor_status()
    assert not status.available
    assert "medmerge setup-nltk" in status.reason

    for doc, pred in zip(DOCS, PREDS):
        out = hooks.generation_results(doc, [pred], target="section_text")
        assert "meteor" not in out and "composite" not in out
        assert set(out) == {"rouge1", "rouge2", "rougeL", "bleu"}
    with pytest.raises(metrics.Unavailable, match="setup-nltk"):
        metrics.meteor(PREDS[0], DOCS[0]["section_text"])
    with pytest.raises(metrics.Unavailable):
        metrics.corpus_scores(PREDS, [d["section_text"] for d in DOCS])

    # without METEOR among the metrics the composite is back: the mean of the four others
    items = [hooks.generation_results(d, [p], target="section_text", groups=("rouge", "bleu")) for d, p in zip(DOCS, PREDS)]
    assert all("composite" in r and "meteor" not in r for r in items)
    four = {k: sum(r[k] for r in items) / len(items) for k in ("rouge1", "rouge2", "rougeL")}
    four["bleu"] = hooks.agg_bleu([r["bleu"] for r in items])
    assert hooks.agg_composite([r["composite"] for r in items]) == pytest.approx(sum(four.values()) / 4, rel=REL)


def test_wordnet_status_of_empty_folder(tmp_path):
    status = nltk_data.wordnet_status(root=tmp_path)
    assert not status.available
    assert "medmerge setup-nltk" in status.reason
    assert str(tmp_path / "corpora" / "wordnet") in status.reason


# --- 5. punkt_tab written offline ------------------------------------------------------------------


def test_install_punkt_tab_loads_in_nltk(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

    text = "Dr. Smith arrived at 5 p.m. today. He left."
    installed = PunktTokenizer("english").tokenize(text)  # the venv's punkt_tab, on nltk's default path

    written = nltk_data.install_punkt_tab(tmp_path)
    assert written == tmp_path / "tokenizers" / "punkt_tab" / "english"
    assert nltk_data.punkt_available(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])
    assert Path(nltk.data.find("tokenizers/punkt_tab/english/")) == written  # nltk really reads ours
    ours = PunktTokenizer("english")
    assert {"dr", "p.m"} <= ours._params.abbrev_types

    assert ours.tokenize(text) == installed == ["Dr. Smith arrived at 5 p.m. today.", "He left."]
    # the parameters matter: Punkt without them splits after the abbreviations
    assert PunktSentenceTokenizer().tokenize(text) != installed


# --- 6. metric names -------------------------------------------------------------------------------


def test_expand():
    assert metrics.expand(["rouge", "bleu"]) == ("rouge1", "rouge2", "rougeL", "bleu")
    assert metrics.expand(["meteor"]) == ("meteor",)
    with pytest.raises(ValueError, match="bertscore"):
        metrics.expand(["rouge", "bertscore"])
    with pytest.raises(ValueError):
        metrics.corpus_scores(["a"], ["a"], metrics=["rouge1"])  # a metric, not a group name


def test_punkt_tab_is_written_on_first_use_and_the_users_nltk_data_is_accepted(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    monkeypatch.setenv("MEDMERGE_NLTK_DATA", str(ours))
    # the user's NLTK_DATA holds punkt_tab (as NLTK's downloader leaves it, zipped) and WordNet: both accepted,
    # nothing written to medmerge's folder
    (theirs / "tokenizers").mkdir(parents=True)
    (theirs / "tokenizers" / "punkt_tab.zip").write_bytes(b"PK")
    (theirs / "corpora").mkdir()
    (theirs / "corpora" / "wordnet.zip").write_bytes(b"PK")
    monkeypatch.setenv("NLTK_DATA", str(theirs))
    assert nltk_data.ensure_punkt() == theirs and not ours.exists()
    assert nltk_data.wordnet_status().available
    assert not nltk_data.wordnet_status(ours).available  # an explicit folder is that folder only
    # nothing on NLTK_DATA: written into medmerge's folder on first use (offline), then found there
    monkeypatch.setenv("NLTK_DATA", "")
    assert nltk_data.ensure_punkt() == ours and nltk_data.punkt_available(ours)
    assert str(ours) in nltk.data.path and not nltk_data.wordnet_status().available
    assert nltk_data.ensure_punkt() == ours


def test_punkt_tab_falls_back_to_a_user_cache_where_the_environment_is_read_only(tmp_path, monkeypatch):
    import nltk

    if os.geteuid() == 0:
        monkeypatch.setattr(nltk_data, "install_punkt_tab", _read_only_then_real(nltk_data.install_punkt_tab))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    monkeypatch.setenv("MEDMERGE_NLTK_DATA", str(locked / "nltk_data"))
    monkeypatch.setenv("NLTK_DATA", "")
    monkeypatch.delenv("MEDMERGE_CACHE", raising=False)  # medmerge's cache folder then follows XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = nltk_data.ensure_punkt()
    assert root == tmp_path / "cache" / "medmerge" / "nltk_data" and nltk_data.punkt_available(root)
    assert os.environ["MEDMERGE_NLTK_DATA"] == str(root) and str(root) in nltk.data.path


def _read_only_then_real(install):
    """As root, a 0555 folder is writable: refuse the first write (the environment's folder) as it would be."""
    calls = []

    def fake(root):
        calls.append(root)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(root))
        return install(root)

    return fake


def _ensure_in_a_process(barrier, results):
    barrier.wait(timeout=60)
    try:
        results.put(str(nltk_data.ensure_punkt()))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(f"failed: {type(e).__name__}: {e}")


def test_processes_started_together_write_punkt_tab_once_and_all_find_it(tmp_path, monkeypatch):
    import multiprocessing as mp

    monkeypatch.setenv("MEDMERGE_NLTK_DATA", str(tmp_path / "shared"))
    monkeypatch.setenv("NLTK_DATA", "")
    ctx, n = mp.get_context("fork"), 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_a_process, args=(barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert got == [str(tmp_path / "shared")] * n, got
    folder = nltk_data.punkt_dir(tmp_path / "shared")
    assert nltk_data.punkt_available(tmp_path / "shared")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["english"]  # no staging folder left behind
    from punkt.data import english

    assert len((folder / "sent_starters.txt").read_text().splitlines()) == len(english.SENT_STARTERS)
