"""Nothing lost, nothing silently wrong: careless inputs to eval, compare, tasks, setup-nltk and analyze
fail with a message naming the file, key or row and what to do (never a traceback, never a silent wrong result)."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.cli.common import console
from medmerge.errors import InputError, MedmergeError
from medmerge.evaluation import nltk_data
from medmerge.evaluation.compare import compare
from medmerge.evaluation.registry import shipped_tasks
from medmerge.evaluation.runner import check_request, results_record
from medmerge.evaluation.taskfile import load_task_file
from medmerge.tiny import make_lora_adapter, make_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Error messages on one line, so that paths in them are not wrapped."""
    monkeypatch.setattr(console, "width", 2000)


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, a same-shaped model with other weights, and a LoRA adapter trained on each."""
    root = tmp_path_factory.mktemp("guards")
    base = make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64)
    other = make_model(root / "other", arch="llama", seed=1, hidden=32, layers=2, vocab=64)
    return {"base": base, "other": other, "lora": make_lora_adapter(root / "lora", base),
            "other_lora": make_lora_adapter(root / "other_lora", other)}


@pytest.fixture
def task_file(tmp_path) -> Path:
    (tmp_path / "d.jsonl").write_text('{"text": "a b", "ref": "b"}\n{"text": "c", "ref": "c d"}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\nmetrics: [rouge]\n"
                    "max_new_tokens: 4\n")
    return spec


# --- 1. eval --peft checks the adapter's recorded base -------------------------------------------


def test_peft_adapter_trained_on_another_same_shaped_base_is_refused(family, task_file):
    # same architecture and shapes, other weights: the shape check alone passes, the base check does not
    with pytest.raises(InputError, match=r"adapter .*other_lora was trained on another base, .*other, whose "
                                         r"weights differ .*--no-base-check"):
        check_request(family["base"], [], None, peft=family["other_lora"], task_files=[task_file], device="cpu")
    req = check_request(family["base"], [], None, peft=family["other_lora"], task_files=[task_file], device="cpu",
                        base_check=False)
    assert req.base_check == "skipped (--no-base-check)"
    ok = check_request(family["base"], [], None, peft=family["lora"], task_files=[task_file], device="cpu")
    assert "trained on this base folder" in ok.base_check
    record = results_record({"results": {}, "configs": {}}, ok, False)
    assert record["model"]["peft"]["base_check"] == ok.base_check


def test_peft_recorded_fingerprint_is_enforced(family, task_file, tmp_path):
    lora = shutil.copytree(family["lora"], tmp_path / "lora")
    (lora / "medmerge_train.json").write_text(json.dumps({"base": {"fingerprint": "0" * 64}}))
    with pytest.raises(InputError, match=r"is not the one adapter .* was trained on: its recorded base fingerprint "
                                         r"000000000000\.\.\."):
        check_request(family["base"], [], None, peft=lora, task_files=[task_file], device="cpu")


def test_eval_cli_has_no_base_check(family, task_file, tmp_path):
    result = _cli("eval", family["base"], "--peft", family["other_lora"], "--task-file", task_file,
                  "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "trained on another base" in result.output
    assert "--no-base-check" in _cli("eval", "--help").output


# --- 2. empty targets in a task file -------------------------------------------------------------


def test_empty_target_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "ref": "b"}\n\n{"text": "c", "ref": "  "}\n{"text": "e"}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\n")
    with pytest.raises(InputError, match=r"d.jsonl, line 3: the target 'ref' is empty.*skip_empty_targets: true"):
        load_task_file(spec)
    (tmp_path / "d.csv").write_text('text,ref\na,b\n"multi\nline",x\nc,\n')
    spec.write_text("name: t\ndata: d.csv\ninput: text\ntarget: ref\nprompt: '{input}'\n")
    with pytest.raises(InputError, match=r"d.csv, line 5: the target 'ref' is empty"):
        load_task_file(spec)


def test_empty_targets_skipped_on_request_and_counted(tmp_path, family):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "ref": "b"}\n{"text": "c", "ref": ""}\n{"text": "e"}\n'
                                      '{"text": "f", "ref": null}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\nskip_empty_targets: true\n"
                    "max_new_tokens: 4\n")
    task = load_task_file(spec)
    assert [d["text"] for d in task.docs()] == ["a"]
    assert task.skipped == ["line 2", "line 3", "line 4"]
    req = check_request(family["base"], [], None, task_files=[spec], device="cpu")
    record = results_record({"results": {}, "configs": {}}, req, False)
    assert record["skipped"] == {"t": {"reason": "empty target 'ref' (skip_empty_targets: true)", "count": 3,
                                       "rows": ["line 2", "line 3", "line 4"]}}
    (tmp_path / "d.jsonl").write_text('{"text": "c", "ref": ""}\n')
    with pytest.raises(InputError, match="every row's target 'ref' is empty"):
        load_task_file(spec)


# --- 3. compare: unknown metrics -----------------------------------------------------------------


def _results(folder: Path, tasks: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"schema": "medmerge.eval/1", "tasks": tasks}))
    return folder


def test_compare_unknown_metric_lists_those_found(tmp_path):
    a = _results(tmp_path / "a", {"mm_medqa": {"acc": 0.5}, "mm_ifeval": {"prompt_level_strict_acc": 0.4}})
    with pytest.raises(InputError, match=r"--if-metric mm_ifeval/prompt_strict: no input has it; metrics found: "
                                         r"mm_ifeval/mean, mm_ifeval/prompt_level_strict_acc, mm_medqa/acc, "
                                         r"mm_medqa/mean"):
        compare([a], {}, if_metric="mm_ifeval/prompt_strict")
    with pytest.raises(InputError, match=r"--clinical-metric mm_medqa/accuracy: no input has it; metrics found: .*"
                                         r"mm_medqa/acc"):
        compare([a], {}, clinical_metrics=["mm_medqa/accuracy"])
    with pytest.raises(InputError, match=r"--if-metric mm_nope/mean: no input has it"):
        compare([a], {}, if_metric="mm_nope/mean")
    result = _cli("compare", a, "--clinical-metric", "mm_medqa/accuracy")
    assert result.exit_code == 2 and "metrics found" in result.output


def test_compare_default_if_metric_missing_is_a_note(tmp_path):
    a = _results(tmp_path / "a", {"mm_medqa": {"acc": 0.5}})
    b = _results(tmp_path / "b", {"mm_medqa": {"acc": 0.6}, "mm_ifeval": {"prompt_level_strict_acc": 0.4}})
    report = compare([a, b], {})
    assert any("mm_ifeval/mean is missing from a" in n for n in report["notes"])


# --- 4. setup-nltk --wordnet-dir ------------------------------------------------------------------


def test_wordnet_dir_missing_or_empty_or_partial_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMERGE_NLTK_DATA", str(tmp_path / "nltk"))
    with pytest.raises(InputError, match=r"--wordnet-dir .*nonexistent does not exist"):
        nltk_data.setup(wordnet_source=tmp_path / "nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"--wordnet-dir .*empty holds none of WordNet 3.0's dict files"):
        nltk_data.setup(wordnet_source=tmp_path / "empty")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "data.noun").write_text("x")
    with pytest.raises(InputError, match=r"--wordnet-dir .*part lacks WordNet 3.0's data.adj, data.adv"):
        nltk_data.setup(wordnet_source=tmp_path / "part")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        nltk_data.setup(wordnet_source=tmp_path / "afile")
    assert not (tmp_path / "nltk").exists()  # checked before anything is written
    result = _cli("setup-nltk", "--wordnet-dir", tmp_path / "nonexistent")
    assert result.exit_code == 2 and "does not exist" in result.output and "ok" not in result.output


def test_wordnet_dir_given_is_installed_even_when_one_is(tmp_path):
    root = tmp_path / "nltk"
    for src in (tmp_path / "wn1", tmp_path / "wn2"):  # the second replaces the first: the folder asked for is used
        src.mkdir()
        for name in nltk_data.WORDNET_FILES:
            (src / name).write_text(f"{src.name}\n")
        report = nltk_data.setup(root, wordnet_source=src)
        assert report["wordnet"] and (nltk_data.wordnet_dir(root) / "data.noun").read_text() == f"{src.name}\n"


# --- 5. a model folder without a tokenizer --------------------------------------------------------


def test_model_without_tokenizer_names_folder_and_files(family, task_file, tmp_path):
    bare = shutil.copytree(family["base"], tmp_path / "bare")
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(InputError, match=r"model folder .*bare has no tokenizer \(none of tokenizer.json, "
                                         r"tokenizer.model.*found: config.json, generation_config.json, "
                                         r"model.safetensors\).*copy the tokenizer files"):
        check_request(bare, [], None, task_files=[task_file], device="cpu")
    result = _cli("eval", bare, "--task-file", task_file, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "has no tokenizer" in result.output


# --- 6. --include-path ---------------------------------------------------------------------------


def test_include_path_problems_are_errors(tmp_path):
    with pytest.raises(InputError, match=r"--include-path .*missing does not exist"):
        shipped_tasks([tmp_path / "missing"])
    (tmp_path / "afile.yaml").write_text("task: x\n")
    with pytest.raises(InputError, match=r"--include-path .*afile.yaml is a file"):
        shipped_tasks([tmp_path / "afile.yaml"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"--include-path .*empty holds no .yaml task files"):
        shipped_tasks([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.yaml").write_text("task: [unclosed\n")
    with pytest.raises(InputError, match=r"bad/x.yaml, line 2: not valid YAML \(expected ',' or ']'"):
        shipped_tasks([tmp_path / "bad"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match=r"bin/x.yaml: not UTF-8 text"):
        shipped_tasks([tmp_path / "bin"])
    for args in (("tasks", "--include-path", tmp_path / "missing"), ("tasks", "--include-path", tmp_path / "bad")):
        result = _cli(*args)
        assert result.exit_code == 2 and "error:" in result.output


# --- 7. analyze loss --out / analyze leakage --json -----------------------------------------------


@pytest.fixture
def run_log(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    return run


def test_analyze_loss_out_is_checked(run_log, tmp_path, family):
    result = _cli("analyze", "loss", run_log, "--out", tmp_path / "nodir" / "loss.png")
    assert result.exit_code == 2 and "nodir does not exist; create it first" in result.output
    result = _cli("analyze", "loss", run_log, "--out", run_log)
    assert result.exit_code == 2 and "is a folder" in result.output
    model_file = family["base"] / "model.safetensors"
    before = model_file.read_bytes()
    for force in ((), ("--force",)):
        result = _cli("analyze", "loss", run_log, "--out", model_file, *force)
        assert result.exit_code == 2 and ".png, .pdf or .svg" in result.output
    assert model_file.read_bytes() == before
    out = tmp_path / "loss.png"
    assert _cli("analyze", "loss", run_log, "--out", out).exit_code == 0 and out.read_bytes()[:4] == b"\x89PNG"
    result = _cli("analyze", "loss", run_log, "--out", out)
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert _cli("analyze", "loss", run_log, "--out", out, "--force").exit_code == 0
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    result = _cli("analyze", "loss", run_log, "--out", fake, "--force")
    assert result.exit_code == 2 and "is not a PNG image" in result.output and fake.read_text() == "not a picture"


def test_analyze_loss_bad_log_names_the_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{oops\n')
    result = _cli("analyze", "loss", run, "--out", tmp_path / "l.png")
    assert result.exit_code == 2 and "train_log.jsonl, line 2: not valid JSON" in result.output
    (run / "train_log.jsonl").write_text('{"loss": 2.0}\n')
    result = _cli("analyze", "loss", run, "--out", tmp_path / "l.png")
    assert result.exit_code == 2 and "train_log.jsonl, line 1: a loss without a 'step'" in result.output


def _eval_folder(folder: Path, lines: str) -> Path:
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "t.jsonl").write_text(lines)
    return folder


def test_analyze_leakage_bad_samples_and_json_out(tmp_path, family):
    ev = _eval_folder(tmp_path / "ev", '{"response": "<think>x</think> y"}\n{broken\n')
    result = _cli("analyze", "leakage", ev)
    assert result.exit_code == 2 and "samples/t.jsonl, line 2: not valid JSON" in result.output
    (ev / "samples" / "t.jsonl").write_text('{"response": "<think>x</think> y"}\n{"response": "z"}\n')
    result = _cli("analyze", "leakage", ev, "--json", tmp_path / "nodir" / "l.json")
    assert result.exit_code == 2 and "does not exist; create it first" in result.output
    config = family["base"] / "config.json"
    before = config.read_text()
    result = _cli("analyze", "leakage", ev, "--json", config, "--force")
    assert result.exit_code == 2 and "not an earlier leakage report" in result.output and config.read_text() == before
    out = tmp_path / "leak.json"
    assert _cli("analyze", "leakage", ev, "--json", out).exit_code == 0
    assert json.loads(out.read_text())["ev"]["matches"] == 1
    assert _cli("analyze", "leakage", ev, "--json", out).exit_code == 2
    assert _cli("analyze", "leakage", ev, "--json", out, "--force").exit_code == 0


# --- more careless inputs ------------------------------------------------------------------------


def test_compare_rejects_binary_files_and_malformed_results(tmp_path, family):
    with pytest.raises(InputError, match=r"model.safetensors is not a text file"):
        compare([family["base"] / "model.safetensors"], {})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"schema": "medmerge.eval/1", "tasks": ["mm_medqa"]}))
    with pytest.raises(InputError, match=r"bad/results.json: 'tasks' must map each task to its metrics"):
        compare([bad], {})
    (bad / "results.json").write_text(json.dumps({"schema": "medmerge.eval/1", "tasks": {"mm_medqa": {"acc": "0.5"}}}))
    with pytest.raises(InputError, match=r"results.json: tasks.mm_medqa.acc is '0.5', not a number"):
        compare([bad], {})
    lm_eval_output = tmp_path / "lm_eval.json"
    lm_eval_output.write_text(json.dumps({"results": {"mmlu": {"acc,none": 0.5}}, "configs": {}}))
    with pytest.raises(InputError, match="looks like lm-eval's own output"):
        compare([lm_eval_output], {})


def test_task_file_wrong_types_and_duplicate_names(tmp_path, family):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "ref": "b"}\n')
    spec = tmp_path / "t.yaml"
    base = "name: t\ndata: d.jsonl\ninput: text\ntarget: ref\nprompt: '{input}'\n"
    for extra, msg in (("stop: 5\n", "stop must be a string or a list of strings, not 5"),
                       ("metrics: 5\n", "metrics must be a list such as"),
                       ("max_new_tokens: true\n", "max_new_tokens must be a positive integer, not True")):
        spec.write_text(base + extra)
        with pytest.raises(InputError, match=msg):
            load_task_file(spec)
    spec.write_bytes(b"\xff\xfe name: t")
    with pytest.raises(InputError, match="t.yaml: not UTF-8 text"):
        load_task_file(spec)
    (tmp_path / "d.csv").write_bytes(b"text,ref\n\xff\xfe,b\n")
    spec.write_text(base.replace("d.jsonl", "d.csv"))
    with pytest.raises(InputError, match=r"d.csv: not UTF-8 text"):
        load_task_file(spec)
    spec.write_text(base)
    other = tmp_path / "sub" / "t.yaml"
    other.parent.mkdir()
    shutil.copy(tmp_path / "d.jsonl", other.parent / "d.jsonl")
    other.write_text(base)
    with pytest.raises(InputError, match=r"task files .*t.yaml and .*sub/t.yaml both name their task 't'"):
        check_request(family["base"], [], None, task_files=[spec, other], device="cpu")


def test_eval_bad_batch_size_and_dtype(family, task_file):
    with pytest.raises(MedmergeError, match="--batch-size 'abc': use a positive integer, auto or auto:N"):
        check_request(family["base"], [], None, task_files=[task_file], device="cpu", batch_size="abc")
    with pytest.raises(MedmergeError, match="--batch-size 0: use a positive integer"):
        check_request(family["base"], [], None, task_files=[task_file], device="cpu", batch_size=0)
    with pytest.raises(MedmergeError, match="--dtype 'fp33': use auto, float32, bfloat16 or float16"):
        check_request(family["base"], [], None, task_files=[task_file], device="cpu", dtype="fp33")
    assert check_request(family["base"], [], None, task_files=[task_file], device="cpu", batch_size="auto:4",
                         dtype="bfloat16").batch_size == "auto:4"


def test_max_new_tokens_beyond_the_model_context_is_an_error(family, task_file, tmp_path):
    # lm-eval asserts this mid-run ("Invalid configuration: requested max tokens to generate ...")
    long_task = tmp_path / "long.yaml"
    long_task.write_text(task_file.read_text().replace("max_new_tokens: 4", "max_new_tokens: 128"))
    with pytest.raises(InputError, match=r"long.yaml: max_new_tokens is 128, but the model .*base holds at most 128 "
                                         r"tokens \(max_position_embeddings in its config.json\)"):
        check_request(family["base"], [], None, task_files=[long_task], device="cpu")
    with pytest.raises(InputError, match=r"--gen-kwargs max_new_tokens is 500"):
        check_request(family["base"], [], None, task_files=[task_file], device="cpu", gen_kwargs="max_new_tokens=500")
    check_request(family["base"], [], None, task_files=[long_task], device="cpu", gen_kwargs="max_new_tokens=8")


def test_analyze_runs_with_one_label_are_refused(tmp_path):
    for parent in ("a", "b"):
        run = tmp_path / parent / "run"
        run.mkdir(parents=True)
        (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    result = _cli("analyze", "loss", tmp_path / "a" / "run", tmp_path / "b" / "run", "--out", tmp_path / "l.png")
    assert result.exit_code == 2 and "all get the label 'run'" in result.output and not (tmp_path / "l.png").exists()
    ok = _cli("analyze", "loss", f"a={tmp_path / 'a' / 'run'}", f"b={tmp_path / 'b' / 'run'}", "--out",
              tmp_path / "l.png")
    assert ok.exit_code == 0, ok.output


def test_decoding_grid_checks_every_setting_before_creating_out(family, task_file, tmp_path):
    from medmerge.experiments.analysis import decoding_grid

    out = tmp_path / "grid"
    same = [{"name": "warm a", "temperature": 0.6}, {"name": "warm/a", "temperature": 0.7}]
    with pytest.raises(InputError, match=r"decoding settings 'warm a' and 'warm/a' would share the folder warm_a"):
        decoding_grid(family["base"], same, [], out, task_files=[task_file], device="cpu")
    with pytest.raises(MedmergeError, match=r"--gen-kwargs top_p=1.5: use a number > 0.0 and <= 1.0"):
        decoding_grid(family["base"], ["greedy", "t=0.7,p=1.5"], [], out, task_files=[task_file], device="cpu")
    assert not out.exists()
    report = decoding_grid(family["base"], ["greedy", "t=0.7,p=0.9"], [], out, task_files=[task_file], device="cpu",
                           max_new_tokens=3)
    assert [r["setting"] for r in report["settings"]] == ["greedy", "t=0.7,p=0.9"]
    assert (out / "greedy" / "results.json").is_file() and (out / "decoding.png").is_file()


def test_gen_kwargs_are_checked_before_loading(family, task_file):
    for text, msg in (("temperature=abc", r"temperature='abc': use a number >= 0.0"),
                      ("max_new_tokens=-5", r"max_new_tokens=-5: use an integer >= 1"),
                      ("do_sample=1", r"do_sample=1: use true or false"),
                      ("bogus=1", r"bogus: not a generation setting transformers knows")):
        with pytest.raises(MedmergeError, match=msg):
            check_request(family["base"], [], None, task_files=[task_file], device="cpu", gen_kwargs=text)
    check_request(family["base"], [], None, task_files=[task_file], device="cpu",
                  gen_kwargs="temperature=0.7,top_p=0.9,do_sample=true,max_new_tokens=3,num_beams=1,min_p=0.1")


def test_include_path_group_entries(tmp_path):
    from medmerge.evaluation.registry import group_members

    (tmp_path / "g.yaml").write_text("group: g\ntask: 5\n")
    with pytest.raises(InputError, match=r"g.yaml: group 'g' must list its tasks under 'task', not 5"):
        group_members("g", [tmp_path])
    (tmp_path / "g.yaml").write_text("group: g\ntask:\n  - a\n  - task: b\n    dataset_path: x\n")
    assert group_members("g", [tmp_path]) == ["a", "b"]


def test_task_file_or_data_that_is_a_folder(tmp_path):
    with pytest.raises(InputError, match=r"task file .* is a folder; pass the task's SPEC.yaml"):
        load_task_file(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "t.yaml").write_text("name: t\ndata: data\ninput: text\ntarget: ref\nprompt: '{input}'\n")
    with pytest.raises(InputError, match=r"data .*data is a folder"):
        load_task_file(tmp_path / "t.yaml")


def test_shipped_data_with_wrong_types_or_empty_references(tmp_path):
    from medmerge.evaluation import data

    def jsonl(rel: str, rows: list) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("medqa/test.jsonl", [{"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": 0}])
    with pytest.raises(InputError, match=r"test.jsonl, line 1: answer_idx must be one of A, B, C, D, not 0"):
        data.load_medqa(tmp_path)
    jsonl("meqsum/meqsum.jsonl", [{"chq": "a", "summary": "b"}, {"chq": "c", "summary": " "}])
    with pytest.raises(InputError, match=r"meqsum.jsonl, line 2: the reference 'summary' is empty"):
        data.load_meqsum(tmp_path)
    jsonl("ifeval/input_data.jsonl", [{"key": 1, "prompt": "p", "instruction_id_list": ["x"], "kwargs": 5}])
    with pytest.raises(InputError, match=r"input_data.jsonl, line 1: kwargs must be a list of objects"):
        data.load_ifeval(tmp_path)
    (tmp_path / "pubmedqa").mkdir()
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text(json.dumps({"1": "not an object"}))
    (tmp_path / "pubmedqa" / "test_ground_truth.json").write_text(json.dumps({"1": "yes"}))
    with pytest.raises(InputError, match=r"ori_pqal.json, item 1: expected an object"):
        data.load_pubmedqa(tmp_path)
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text(json.dumps(
        {"1": {"QUESTION": "q", "CONTEXTS": "one string", "final_decision": "yes"}}))
    with pytest.raises(InputError, match=r"item 1: CONTEXTS must be a list"):
        data.load_pubmedqa(tmp_path)
