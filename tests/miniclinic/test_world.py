"""MiniClinic's synthetic world: determinism, a consistent knowledge base, checked instruction data,
held-out evaluation sets, the alignment sets, the tokenizer, and the four lm-eval tasks end to end."""

import json
import re
from pathlib import Path

import pytest

from medmerge.miniclinic import tokenizer as tokmod
from medmerge.miniclinic import world

SMALL = world.WorldSpec(seed=7, n_conditions=12, general_docs=600, clinical_docs=400, sft_examples=300,
                        if_eval_prompts=40, mcq_eval=40, gen_train=80, gen_eval=30, align_train=60, align_eval=30)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("miniclinic")
    report = world.generate(out, SMALL)
    return {"out": out, "data": out / "data", "report": report}


def _files(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _kb(data: Path) -> dict:
    return json.loads((data / "knowledge.json").read_text())


# --- layout, presets, determinism ------------------------------------------------------------------


def test_layout_and_report(small):
    data, report = small["data"], small["report"]
    for name, path in world.paths_of(data).items():
        assert path.exists(), name
    c = report["counts"]
    assert c["general"]["documents"] == SMALL.general_docs == len(_lines(data / "corpora" / "general.txt"))
    assert c["clinical"]["documents"] == SMALL.clinical_docs == len(_lines(data / "corpora" / "clinical.txt"))
    assert c["sft"]["examples"] == SMALL.sft_examples == len(world.read_jsonl(data / "sft" / "instructions.jsonl"))
    assert (c["eval"]["if"], c["eval"]["mcq"], c["eval"]["gen"], c["eval"]["align"]) == (40, 40, 30, 30)
    assert c["align_train"]["examples"] == 60 == len(world.read_jsonl(data / "align" / "train.jsonl"))
    assert c["general"]["tokens"] > 10 * SMALL.general_docs and c["clinical"]["tokens"] > 10 * SMALL.clinical_docs
    assert json.loads((data / "world.json").read_text())["counts"] == c
    tok = world.load_tokenizer(data)
    for key, texts in (("general", _lines(data / "corpora" / "general.txt")),
                       ("clinical", _lines(data / "corpora" / "clinical.txt"))):
        assert c[key]["tokens"] == sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    for row in world.read_jsonl(data / "tasks" / "gen_train.jsonl"):
        assert set(row) >= {"prompt", "findings", "impression"}


def test_presets():
    quick, full = world.PRESETS["quick"], world.PRESETS["full"]
    assert (quick.sft_examples, quick.if_eval_prompts, quick.mcq_eval, quick.gen_eval) == (1500, 100, 100, 100)
    assert (full.sft_examples, full.if_eval_prompts, full.mcq_eval, full.gen_eval) == (6000, 200, 200, 200)
    assert (quick.align_train, quick.align_eval, full.align_train, full.align_eval) == (400, 100, 1000, 200)
    assert quick.general_docs < full.general_docs and quick.clinical_docs < full.clinical_docs


def test_same_seed_same_bytes_other_seed_other_world(small, tmp_path):
    again = world.generate(tmp_path / "again", SMALL)
    assert again["counts"] == small["report"]["counts"]
    assert _files(tmp_path / "again" / "data") == _files(small["data"])
    world.generate(tmp_path / "other", SMALL.replace(seed=8))
    a, b = _files(small["data"]), _files(tmp_path / "other" / "data")
    assert a.keys() == b.keys()
    for name in ("knowledge.json", "corpora/general.txt", "corpora/clinical.txt", "sft/instructions.jsonl",
                 "eval/if.jsonl", "eval/mcq.jsonl", "eval/gen.jsonl", "tasks/gen_train.jsonl", "align/train.jsonl",
                 "eval/align.jsonl"):
        assert a[name] != b[name], name


# --- the knowledge base and the clinical text ------------------------------------------------------


def test_knowledge_base_is_consistent(small):
    kb = _kb(small["data"])["conditions"]
    assert len(kb) == SMALL.n_conditions
    for key in ("name", "drug", "test"):
        assert len({c[key] for c in kb}) == len(kb), f"{key} not unique"
    findings = [f for c in kb for f in c["findings"]]
    assert len(set(findings)) == len(findings)
    assert len({tuple(c["symptoms"]) for c in kb}) == len(kb)
    assert world.keyword_clashes(world.knowledge.KnowledgeBase.from_json(_kb(small["data"]))) == []


def test_clinical_text_states_the_knowledge_base(small):
    data = small["data"]
    kb = {c["name"]: c for c in _kb(data)["conditions"]}
    by_drug = {c["drug"]: c for c in kb.values()}
    by_test = {c["test"]: c for c in kb.values()}
    texts = _lines(data / "corpora" / "clinical.txt")
    texts += [r["response"].lower() for r in world.read_jsonl(data / "sft" / "instructions.jsonl")]
    text = "\n".join(texts).lower()
    checks = {
        r"(\w+) is treated with (\w+)\.": lambda c, d: kb[c]["drug"] == d,
        r"the drug of choice for (\w+) is (\w+)\.": lambda c, d: kb[c]["drug"] == d,
        r"patients with (\w+) receive (\w+)\.": lambda c, d: kb[c]["drug"] == d,
        r"(\w+) is used to treat (\w+)\.": lambda d, c: kb[c]["drug"] == d,
        r"(\w+) is a disease of the (\w+)\.": lambda c, o: kb[c]["organ"] == o,
        r"the (\w+ \w+) is used to confirm (\w+)\.": lambda t, c: kb[c]["test"] == t,
        r"the (\w+ \w+) confirmed (\w+)\.": lambda t, c: kb[c]["test"] == t,
        r"discharge diagnosis: (\w+)\. discharge medication: (\w+)": lambda c, d: kb[c]["drug"] == d,
        r"impression: findings are consistent with (\w+)\. recommend the (\w+ \w+)\.":
            lambda c, t: kb[c]["test"] == t,
        r"common symptoms of (\w+) are ([a-z ,]+)\.":
            lambda c, s: sorted(re.split(r", | and ", s)) == sorted(kb[c]["symptoms"]),
        r"common side effects of (\w+) are ([a-z ,]+)\.":
            lambda d, s: sorted(re.split(r", | and ", s)) == sorted(by_drug[d]["side_effects"]),
    }
    for pattern, holds in checks.items():
        matches = re.findall(pattern, text)
        assert matches, pattern
        for m in matches:
            assert holds(*m), (pattern, m)
    for c in kb.values():
        assert c["name"] in text and c["drug"] in text and c["test"] in text
    # every finding a report lists belongs to the condition its impression names (or is a normal statement)
    organs = _kb(data)["organs"]
    for doc in _lines(data / "corpora" / "clinical.txt"):
        m = re.search(r"Findings: (.*) Impression: Findings are consistent with (\w+)\.", doc)
        if not m:
            continue
        c = kb[m.group(2)]
        for sentence in re.findall(r"[^.]+\.", m.group(1)):
            sentence = sentence.strip()
            ok = sentence in organs[c["organ"]]["normals"] or sentence == "No other abnormality is seen."
            ok = ok or any(f in sentence.lower() for f in c["findings"])
            assert ok, (sentence, c["name"])
    assert by_test  # tests are unique, so every test names one condition


def test_mcq_answers_come_from_the_knowledge_base(small):
    data = small["data"]
    kb = {c["name"]: c for c in _kb(data)["conditions"]}
    rows = world.read_jsonl(data / "eval" / "mcq.jsonl")
    assert {r["type"] for r in rows} == set(world.evalsets.MCQ_TEMPLATES)
    for r in rows:
        c = kb[r["condition"]]
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["answer"] < 4
        answer = r["choices"][r["answer"]]
        expected = {"drug": [c["drug"]], "test": [c["test"]], "organ": [c["organ"]], "symptom": c["symptoms"],
                    "drug_condition": [c["name"]], "finding_condition": [c["name"]]}[r["type"]]
        assert answer in expected
        wrong = [x for i, x in enumerate(r["choices"]) if i != r["answer"]]
        assert not set(wrong) & set(expected)
    for r in world.read_jsonl(data / "eval" / "gen.jsonl"):
        c = kb[r["condition"]]
        assert r["impression"] == f"Findings are consistent with {c['name']}. Recommend the {c['test']}."
        assert r["prompt"] == f"Findings: {r['findings']} Impression:"
        assert any(f in r["findings"].lower() for f in c["findings"])


# --- instruction data: lm-eval's checkers --------------------------------------------------------------


def test_every_instruction_example_passes_lm_evals_checkers(small):
    from medmerge.miniclinic import ifcheck

    rows = world.read_jsonl(small["data"] / "sft" / "instructions.jsonl")
    registry = __import__("lm_eval.tasks.ifeval.instructions_registry", fromlist=["x"]).INSTRUCTION_DICT
    used = set()
    for row in rows:
        ids = row["instruction_id_list"]
        assert ids[-1] == "keywords:existence" and row["kwargs"][-1] == {"keywords": [row["subject"]]}
        assert all(i in registry for i in ids)
        used.update(ids)
        assert all(ifcheck.follows(row["prompt"], row["response"], ids, row["kwargs"])), row
        assert tokmod.count_pieces(row["response"]) + 1 <= SMALL.max_response_tokens
    assert used == set(world.instructions.INSTRUCTION_TYPES)
    # the evaluation path (lm-eval's process_results through the task hook) agrees
    from medmerge.miniclinic.evaltasks import if_results

    for key, row in enumerate(rows[:40]):
        doc = {"key": key, **{k: row[k] for k in ("prompt", "instruction_id_list", "kwargs")}}
        assert if_results(doc, [row["response"]])["prompt_level_strict_acc"] is True


def test_if_eval_prompts_are_ifeval_rows_and_off_topic_answers_fail(small):
    from medmerge.miniclinic import ifcheck

    rows = world.read_jsonl(small["data"] / "eval" / "if.jsonl")
    assert [r["key"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
        assert 2 <= len(r["instruction_id_list"]) <= 3 and r["instruction_id_list"][-1] == "keywords:existence"
        for iid, kw in zip(r["instruction_id_list"][:-1], r["kwargs"][:-1]):
            assert ifcheck.describe(iid, kw) in r["prompt"]  # IFEval's own wording
    lower = next(r for r in rows if r["instruction_id_list"][0] == "change_case:english_lowercase")
    topic = lower["kwargs"][-1]["keywords"][0]
    other = next(t for t in world.lexicon.TOPICS if t.word != topic and t.word not in lower["prompt"])
    off_topic = f"{other.np} is nice and we like {other.np} very much."
    verdict = ifcheck.follows(lower["prompt"], off_topic, lower["instruction_id_list"], lower["kwargs"])
    assert verdict[0] is True and verdict[-1] is False  # lowercase alone would have passed


# --- alignment sets: format-following findings -> impression ------------------------------------------------


def test_every_align_example_passes_lm_evals_checkers(small):
    from medmerge.miniclinic import align, ifcheck
    from medmerge.miniclinic.evaltasks import if_results

    data = small["data"]
    kb = {c["name"]: c for c in _kb(data)["conditions"]}
    rows = world.read_jsonl(data / "align" / "train.jsonl")
    assert [r["id"] for r in rows] == list(range(len(rows)))
    used = set()
    for row in rows:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        assert 2 <= len(ids) <= 3 and set(ids[:-1]) <= set(align.CONSTRAINTS)
        assert ids[-1] == "keywords:existence" and kwargs[-1] == {"keywords": [row["condition"]]}
        assert row["prompt"].startswith(f"Findings: {row['findings']} Impression: ")
        for iid, kw in zip(ids[:-1], kwargs[:-1]):
            assert ifcheck.describe(iid, kw) in row["prompt"]  # IFEval's own wording
        assert all(ifcheck.follows(row["prompt"], row["response"], ids, kwargs)), row
        c = kb[row["condition"]]
        impression = f"the findings are consistent with {c['name']}. recommend the {c['test']}."
        assert impression in row["response"].lower()  # the correct impression, reformatted
        assert any(f in row["findings"].lower() for f in c["findings"])
        used.update(ids)
    assert used == set(align.CONSTRAINTS) | {"keywords:existence"}
    for key, row in enumerate(rows[:20]):  # the evaluation path agrees
        doc = {"key": key, **{k: row[k] for k in ("prompt", "instruction_id_list", "kwargs")}}
        assert if_results(doc, [row["response"]])["prompt_level_strict_acc"] is True


def test_align_eval_rows_need_the_right_condition_and_the_format(small):
    import random

    from medmerge.miniclinic import align, ifcheck, knowledge

    data = small["data"]
    kb = knowledge.KnowledgeBase.from_json(_kb(data))
    rows = world.read_jsonl(data / "eval" / "align.jsonl")
    assert [r["key"] for r in rows] == list(range(len(rows))) and len(rows) == SMALL.align_eval
    assert {r["kwargs"][-1]["keywords"][0] for r in rows} == {c.name for c in kb.conditions}  # balanced
    closings = ("Ask your doctor.",)
    for r in rows:
        assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
        ids, kwargs = r["instruction_id_list"], r["kwargs"]
        assert 2 <= len(ids) <= 3 and ids[-1] == "keywords:existence"
        for iid, kw in zip(ids[:-1], kwargs[:-1]):
            assert ifcheck.describe(iid, kw) in r["prompt"]
        name = kwargs[-1]["keywords"][0]
        assert name not in r["prompt"].lower()  # the findings do not name the condition: knowing it is the task
        right = next(c for c in kb.conditions if c.name == name)
        wrong = next(c for c in kb.conditions if c.name != name)
        constraints = dict(zip(ids[:-1], kwargs[:-1]))
        good = align.render(right, constraints, random.Random(0), closings)
        assert all(ifcheck.follows(r["prompt"], good, ids, kwargs)), (r, good)
        # the right format naming another condition fails on the hidden keyword only
        other = align.render(wrong, constraints, random.Random(0), closings)
        verdict = ifcheck.follows(r["prompt"], other, ids, kwargs)
        assert verdict == [True] * (len(ids) - 1) + [False]
    # the right condition in the wrong format fails on the format only
    lower = next(r for r in rows if "change_case:english_lowercase" in r["instruction_id_list"])
    right = next(c for c in kb.conditions if c.name == lower["kwargs"][-1]["keywords"][0])
    plain = align.answer(right)
    verdict = ifcheck.follows(lower["prompt"], plain, lower["instruction_id_list"], lower["kwargs"])
    assert verdict[lower["instruction_id_list"].index("change_case:english_lowercase")] is False and verdict[-1]
    assert not all(verdict)


def test_align_sets_leave_the_rest_of_the_world_alone(small, tmp_path):
    """The align sets come from their own streams: their sizes change no other file (nor the tokenizer)."""
    world.generate(tmp_path, SMALL.replace(align_train=10, align_eval=5))
    a, b = _files(small["data"]), _files(tmp_path / "data")
    changed = {name for name in a.keys() | b.keys() if a.get(name) != b.get(name)}
    assert changed == {"align/train.jsonl", "eval/align.jsonl", "world.json"}


# --- held out ------------------------------------------------------------------------------------------


def test_evaluation_items_are_held_out(small):
    data = small["data"]
    assert world.check_world(data) == []
    training = "\n".join(p.read_text(encoding="utf-8") for p in (
        data / "corpora" / "general.txt", data / "corpora" / "clinical.txt", data / "sft" / "instructions.jsonl",
        data / "tasks" / "gen_train.jsonl", data / "align" / "train.jsonl"))
    sft_prompts = {r["prompt"] for r in world.read_jsonl(data / "sft" / "instructions.jsonl")}
    for r in world.read_jsonl(data / "eval" / "if.jsonl"):
        assert r["prompt"] not in sft_prompts
        assert json.dumps(r["prompt"])[1:-1] not in training
    for r in world.read_jsonl(data / "eval" / "mcq.jsonl"):
        assert r["question"] not in training and r["question"].lower() not in training.lower()
    train_findings = {r["findings"] for r in world.read_jsonl(data / "tasks" / "gen_train.jsonl")}
    train_findings |= {r["findings"] for r in world.read_jsonl(data / "align" / "train.jsonl")}
    for r in world.read_jsonl(data / "eval" / "gen.jsonl"):
        assert r["findings"] not in train_findings and r["prompt"] not in training
    gen_findings = {r["findings"] for r in world.read_jsonl(data / "eval" / "gen.jsonl")}
    for r in world.read_jsonl(data / "eval" / "align.jsonl"):
        findings = world.align.findings_of(r["prompt"])
        assert findings not in train_findings and findings not in gen_findings
        assert json.dumps(f"Findings: {findings} Impression:")[1:-1] not in training
        assert json.dumps(r["prompt"])[1:-1] not in training


def test_held_out_check_catches_a_leaked_align_item(small):
    data = small["data"]
    row = world.read_jsonl(data / "eval" / "align.jsonl")[0]
    findings = world.align.findings_of(row["prompt"])
    common = {"if_prompts": [], "mcq": [], "gen": [], "sft_prompts": set(), "align_eval": [row]}
    assert world.check_held_out(train_texts=["The river is long."], train_findings=set(), **common) == []
    assert world.check_held_out(train_texts=[], train_findings={findings}, **common)
    report = f"Chest x ray. Findings: {findings} Impression: Findings are consistent with x."
    assert world.check_held_out(train_texts=[report], train_findings=set(), **common)


# --- tokenizer -----------------------------------------------------------------------------------------------


def test_tokenizer_covers_eval_text_and_round_trips(small):
    data = small["data"]
    tok = world.load_tokenizer(data)
    assert [tok.convert_tokens_to_ids(t) for t in tokmod.SPECIAL_TOKENS] == list(range(7))
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    ifs = world.read_jsonl(data / "eval" / "if.jsonl")
    mcq = world.read_jsonl(data / "eval" / "mcq.jsonl")
    gen = world.read_jsonl(data / "eval" / "gen.jsonl")
    texts = world.eval_strings(ifs, mcq, gen)
    texts += [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                      add_generation_prompt=True) for r in ifs + gen]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    # exact round trip (IFEval's formats survive decoding) and case forms are single tokens
    # (the align sets are not tokenizer training text, yet every piece of them is in the vocabulary)
    texts = [t for r in world.read_jsonl(data / "sft" / "instructions.jsonl") for t in (r["prompt"], r["response"])]
    texts += [t for r in world.read_jsonl(data / "align" / "train.jsonl") for t in (r["prompt"], r["response"])]
    texts += [r["prompt"] for r in world.read_jsonl(data / "eval" / "align.jsonl")]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    kb = _kb(data)["conditions"]
    for word in ("river", "fever", kb[0]["name"], kb[0]["drug"]):
        for form in (word, word.capitalize(), word.upper()):
            ids = tok(" " + form, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tok.unk_token_id and tok.decode(ids) == " " + form
    assert tok("The river.")["input_ids"][0] == tok.bos_token_id  # <s> in front, once


def test_chat_template(small):
    tok = world.load_tokenizer(small["data"])
    user, answer = "Tell me about the river.", "The river is long."
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    assert prompt == tokmod.chat_prompt(user) == f"<s><|user|>\n{user}\n<|assistant|>\n"
    assert full == tokmod.chat_example(user, answer) == prompt + answer + "</s>"
    ids_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    ids_full = tok(full, add_special_tokens=False)["input_ids"]
    assert ids_full[: len(ids_prompt)] == ids_prompt and ids_full[-1] == tok.eos_token_id
    assert ids_prompt.count(tok.bos_token_id) == 1


# --- the lm-eval tasks ----------------------------------------------------------------------------------------


def test_tasks_run_end_to_end(small, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from medmerge.evaluation.registry import shipped_tasks
    from medmerge.evaluation.runner import evaluate

    assert set(world.TASK_NAMES) <= set(shipped_tasks([world.TASKS_DIR]))
    tok = world.load_tokenizer(small["data"])
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tok), max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    results = evaluate(model_dir, list(world.TASK_NAMES), None, include_paths=[world.TASKS_DIR],
                       data_dir=small["data"], limit=3, gen_kwargs="max_new_tokens=8")
    tasks = results["tasks"]
    assert set(tasks["mm_miniclinic_if"]) == {"prompt_level_strict_acc", "inst_level_strict_acc",
                                              "prompt_level_loose_acc", "inst_level_loose_acc"}
    assert set(tasks["mm_miniclinic_mcq"]) >= {"acc", "acc_norm"}
    assert set(tasks["mm_miniclinic_gen"]) >= {"rouge1", "rouge2", "rougeL", "exact_match", "condition_acc"}
    assert set(tasks["mm_miniclinic_align"]) == set(tasks["mm_miniclinic_if"])
    assert results["model"]["chat_template"] is True
    assert all(v == 3 for v in (s["effective"] for s in results["samples"].values()))


def test_task_hooks_name_the_missing_world(tmp_path):
    from medmerge.io.records import DataError
    from medmerge.miniclinic import evaltasks

    with pytest.raises(DataError, match="data/ folder"):
        evaltasks.load("mcq", tmp_path)
    from medmerge.miniclinic import align

    with pytest.raises(DataError, match="mm_miniclinic_align needs .*eval/align.jsonl.*generate it again"):
        align.load_eval(tmp_path)


def test_every_sentence_about_a_subject_names_it():
    import random

    from medmerge.miniclinic import instructions, knowledge, lexicon

    kb = knowledge.build(12, 7, {w.lower() for w in lexicon.words()})
    for subject in instructions.subjects(kb):
        for i in range(5):
            for commas in (True, False):
                sentences = subject.sentences(random.Random(i), commas)
                assert len(sentences) >= 4
                for sentence in sentences:
                    assert subject.keyword in sentence.lower(), (subject.keyword, sentence)
                    assert commas or "," not in sentence
        assert all(subject.keyword in c for c in subject.closings)
