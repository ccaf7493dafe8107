"""`medmerge eval` end to end on tiny random models: every shipped task, PEFT, chat templates, task files."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.evaluation import metrics
from medmerge.evaluation.registry import shipped_tasks
from medmerge.evaluation.runner import evaluate
from medmerge.tiny import make_model, tokenizer_words

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared data folder {SHARED}")
EVAL_WORDS = ["A", "B", "C", "D", "Question", "Answer", "Summary", ":", ".", ",", "?", "Choices", "Abstract"]
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    words = tokenizer_words(96, extra=EVAL_WORDS)
    base = make_model(root / "base", arch="llama", seed=3, hidden=32, layers=2, vocab=96, words=words,
                      max_positions=4096)
    chat = root / "chat"
    shutil.copytree(base, chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(cfg))
    other = make_model(root / "other", arch="llama", seed=4, hidden=48, layers=2, vocab=96, words=words,
                       max_positions=4096)
    return {"base": base, "chat": chat, "other": other, "adapter": _lora(base, root / "lora"),
            "other_adapter": _lora(other, root / "other_lora")}


def _lora(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The shared data plus a tiny MMLU copy in the original CSV layout (MMLU is not in the shared folder)."""
    root = tmp_path_factory.mktemp("eval-data")
    if SHARED.is_dir():
        for sub in SHARED.iterdir():
            if sub.is_dir():
                (root / sub.name).symlink_to(sub)
    for split, n in (("test", 3), ("dev", 2)):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in MMLU_SUBJECTS:
            rows = [f'"Which {subject} answer is {i}?",one,two,three,four,{"ABCD"[i % 4]}' for i in range(n)]
            (root / "mmlu" / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


@needs_shared
def test_every_shipped_task_runs_and_writes_the_documented_schema(models, data_dir, tmp_path):
    names = [n for n in shipped_tasks() if not n.startswith("mm_mmlu_") or n == "mm_mmlu_medical"]
    assert set(names) == {"mm_ifeval", "mm_mts_dialog", "mm_meqsum", "mm_pubmedqa", "mm_medqa", "mm_medmcqa",
                          "mm_mmlu_medical"}
    out = tmp_path / "eval"
    result = _cli("eval", str(models["base"]), "--tasks", ",".join(names), "--out", str(out), "--data-dir",
                  str(data_dir), "--limit", "2", "--gen-kwargs", "max_new_tokens=8", "--log-samples", "--seed", "7")
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "medmerge.eval/1"
    assert res["model"]["path"] == str(models["base"].resolve()) and len(res["model"]["sha256"]) == 64
    tasks = res["tasks"]
    assert set(tasks["mm_ifeval"]) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                       "inst_level_loose_acc"}
    for gen_task in ("mm_mts_dialog", "mm_meqsum"):
        expected = {"rouge1", "rouge2", "rougeL", "bleu", "meteor", "composite"}
        if not metrics.meteor_status().available:
            expected -= {"meteor", "composite"}
            assert set(res["unavailable"][gen_task]) == {"meteor", "composite"}
        assert set(tasks[gen_task]) == expected
        assert res["generation"][gen_task]["max_gen_toks"] == 8 and res["generation"][gen_task]["do_sample"] is False
    for mcq in ("mm_pubmedqa", "mm_medqa", "mm_medmcqa", "mm_mmlu_medical", *(f"mm_mmlu_{s}" for s in MMLU_SUBJECTS)):
        assert set(tasks[mcq]) == {"acc", "acc_norm"}, mcq
        assert 0 <= tasks[mcq]["acc"] <= 1
    assert res["stderr"]["mm_medqa"]["acc"] >= 0
    assert res["samples"]["mm_medqa"] == {"original": 50, "effective": 2}
    assert res["samples"]["mm_pubmedqa"]["original"] == 500
    assert res["config"]["seed"] == 7 and res["config"]["limit"] == 2
    assert {"lm_eval", "torch", "transformers", "rouge_score", "sacrebleu", "nltk"} <= set(res["versions"])
    assert res["wall_time_s"] > 0
    for task in ("mm_ifeval", "mm_mts_dialog", "mm_pubmedqa", "mm_mmlu_anatomy"):
        records = [json.loads(line) for line in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
        assert len(records) == 2
        for r in records:
            assert {"doc", "prompt", "response", "metrics"} <= set(r)
            assert isinstance(r["prompt"], str) and r["prompt"]
    mts = json.loads((out / "samples" / "mm_mts_dialog.jsonl").read_text().splitlines()[0])
    assert mts["prompt"].startswith("Summarize the following doctor-patient conversation as the")
    assert isinstance(mts["metrics"]["bleu"], float)  # per-sample sentence BLEU, not the corpus pair
    # per_doc: the per-document values of the metrics that are per-document means (bootstrap intervals)
    per_doc = res["per_doc"]
    assert per_doc["mm_medqa"]["doc_ids"] == [0, 1]
    assert sum(per_doc["mm_medqa"]["acc"]) / 2 == pytest.approx(tasks["mm_medqa"]["acc"])
    assert sum(per_doc["mm_mts_dialog"]["rougeL"]) / 2 == pytest.approx(tasks["mm_mts_dialog"]["rougeL"])
    assert "prompt_level_strict_acc" in per_doc["mm_ifeval"] and "inst_level_strict_acc" not in per_doc["mm_ifeval"]


def _hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@needs_shared
def test_multiple_choice_equals_hand_computed_option_loglikelihoods(models, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medmerge.evaluation import data, hooks

    res = evaluate(models["base"], ["mm_medqa"], tmp_path / "mcq", data_dir=data_dir, limit=6, log_samples=True)
    records = [json.loads(x) for x in (tmp_path / "mcq" / "samples" / "mm_medqa.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(models["base"]))
    docs = data.load_medqa(data_dir)[:6]
    correct = 0
    for doc, rec in zip(docs, records):
        prompt = hooks.medqa_prompt(doc)
        assert rec["prompt"] == prompt
        hand = {f" {k}": _hand_loglikelihood(model, tok, prompt, f" {k}") for k in "ABCD"}
        for option, ll in hand.items():
            assert rec["option_loglikelihoods"][option] == pytest.approx(ll, abs=1e-4)
        chosen = max(hand, key=hand.get)
        assert rec["response"] == chosen
        correct += chosen.strip() == doc["answer_idx"]
        assert rec["metrics"]["acc"] == float(chosen.strip() == doc["answer_idx"])
    assert res["tasks"]["mm_medqa"]["acc"] == pytest.approx(correct / 6)


@needs_shared
def test_peft_adapter_is_applied_and_recorded(models, data_dir, tmp_path):
    base = evaluate(models["base"], ["mm_medmcqa"], tmp_path / "b", data_dir=data_dir, limit=2, log_samples=True)
    with_lora = evaluate(models["base"], ["mm_medmcqa"], tmp_path / "l", data_dir=data_dir, limit=2,
                         peft=models["adapter"], log_samples=True)
    assert base["model"]["peft"] is None
    assert with_lora["model"]["peft"]["path"] == str(models["adapter"].resolve())
    assert len(with_lora["model"]["peft"]["sha256"]) == 64
    lls = [json.loads((tmp_path / d / "samples" / "mm_medmcqa.jsonl").read_text().splitlines()[0])["option_loglikelihoods"]
           for d in ("b", "l")]
    assert lls[0] != lls[1]  # the adapter changed the model's scores


@needs_shared
def test_chat_template_applied_by_default_and_switchable(models, data_dir, tmp_path):
    kw = dict(data_dir=data_dir, limit=1, log_samples=True, gen_kwargs="max_new_tokens=4")
    on = evaluate(models["chat"], ["mm_meqsum"], tmp_path / "on", system_prompt="You are a clinician.", **kw)
    off = evaluate(models["chat"], ["mm_meqsum"], tmp_path / "off", chat_template="none", **kw)
    plain = evaluate(models["base"], ["mm_meqsum"], tmp_path / "plain", **kw)
    prompts = {d: json.loads((tmp_path / d / "samples" / "mm_meqsum.jsonl").read_text())["prompt"]
               for d in ("on", "off", "plain")}
    assert on["model"]["chat_template"] is True and off["model"]["chat_template"] is False
    assert plain["model"]["chat_template"] is False  # no template: nothing to apply
    assert prompts["on"].startswith("<system> You are a clinician. </s> <user> Summarize")
    assert prompts["on"].endswith("<assistant>")
    assert prompts["off"] == prompts["plain"] and prompts["off"].startswith("Summarize")


def test_task_file_runs_a_user_csv_and_reports_meteor_unavailable_with_reason(models, tmp_path, monkeypatch):
    from medmerge.evaluation import nltk_data

    rows = ["findings,impression", '"no acute disease of the chest","no acute disease"',
            '"fever and cough with chest pain","pneumonia likely"', '"stable asthma","asthma stable"']
    (tmp_path / "rad.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "rad.yaml").write_text(
        "name: radiology_impression\ndata: rad.csv\ninput: findings\ntarget: impression\n"
        "prompt: \"Findings: {input}\\nImpression:\"\nmetrics: [rouge, bleu, meteor]\nmax_new_tokens: 6\n"
    )
    reason = "WordNet is not installed in /nowhere; run `medmerge setup-nltk`"
    monkeypatch.setattr(metrics, "meteor_status", lambda: nltk_data.Availability(False, reason))
    res = evaluate(models["base"], [], tmp_path / "out", task_files=[tmp_path / "rad.yaml"], log_samples=True)
    row = res["tasks"]["radiology_impression"]
    assert set(row) == {"rouge1", "rouge2", "rougeL", "bleu"}
    assert res["unavailable"]["radiology_impression"]["meteor"] == reason
    assert "composite" in res["unavailable"]["radiology_impression"]
    assert res["samples"]["radiology_impression"] == {"original": 3, "effective": 3}
    assert res["generation"]["radiology_impression"]["max_gen_toks"] == 6
    records = [json.loads(x) for x in (tmp_path / "out" / "samples" / "radiology_impression.jsonl").read_text().splitlines()]
    assert records[0]["prompt"] == "Findings: no acute disease of the chest\nImpression:"
    # the task's ROUGE is rouge-score's mean over the logged responses
    expect = metrics.mean([metrics.rouge(r["response"].strip(), r["target"])["rouge1"] for r in records])
    assert math.isclose(row["rouge1"], expect, rel_tol=1e-9)


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (tmp_path / "data").mkdir()  # beside OUT: an output may not lie inside an input
    result = _cli("eval", str(models["base"]), "--tasks", "mm_medqa", "--out", str(out), "--data-dir",
                  str(tmp_path / "data"))
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "results.json").read_text() == "{}"


def test_include_path_plugs_in_another_task_suite(models, tmp_path):
    """How the synthetic clinical world's tasks plug in: a folder of lm-eval YAMLs with their hooks."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "world.py").write_text(
        "import datasets\n"
        "def docs(**kwargs):\n"
        "    rows = [{'q': 'fever and cough ?', 'label': 0}, {'q': 'chest pain ?', 'label': 1}]\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})\n"
    )
    (suite / "world_triage.yaml").write_text(
        "task: world_triage\ncustom_dataset: !function world.docs\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}} Answer:'\ndoc_to_choice: ['yes', 'no']\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    res = evaluate(models["base"], ["world_triage"], None, include_paths=[suite])
    assert set(res["tasks"]["world_triage"]) == {"acc"}
    assert res["config"]["include_paths"] == [str(suite)]


@needs_shared
def test_example_task_file_loads_the_shared_copy(monkeypatch):
    from medmerge.evaluation.taskfile import load_task_file

    monkeypatch.setenv("MEDMERGE_DATA", str(SHARED))
    task = load_task_file(Path(__file__).resolve().parents[2] / "examples" / "clinical_generation_task.yaml")
    docs = task.docs()
    assert len(docs) == 100 and task.render(docs[0]).endswith("Note section:")


@pytest.mark.slow  # indexes all of lm-eval's built-in tasks (about 15 s)
def test_builtin_lm_eval_task_is_accepted_and_fails_clearly_offline(models, tmp_path):
    """Built-in task names pass planning; offline, a hub-backed data set gives an error that says why."""
    from medmerge.errors import MedmergeError

    with pytest.raises(MedmergeError, match=r"built-in task tried to load its data from the Hugging Face hub"):
        evaluate(models["base"], ["pubmedqa"], tmp_path / "out", limit=2)
    assert not (tmp_path / "out").exists()


def test_loaded_model_in_memory_gives_the_same_scores_as_its_folder(models, tmp_path):
    """Sweeps evaluate a model they merged in memory: same numbers as evaluating the saved folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"text": t, "ref": r}) + "\n" for t, r in [("patient reports fever", "fever"), ("chest pain", "pain")]))
    (tmp_path / "t.yaml").write_text("name: mini\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input} :'\n"
                                     "metrics: [rouge, bleu]\nmax_new_tokens: 5\n")
    from_folder = evaluate(models["base"], [], None, task_files=[tmp_path / "t.yaml"])
    model = AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32)
    loaded = evaluate(model, [], None, tokenizer=AutoTokenizer.from_pretrained(str(models["base"])),
                      task_files=[tmp_path / "t.yaml"])
    assert loaded["tasks"] == from_folder["tasks"]
    assert loaded["model"]["path"] is None and loaded["model"]["sha256"] is None
