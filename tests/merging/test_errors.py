"""Bad input: each case is a clear error that names the problem, and leaves no output behind."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medmerge
from medmerge.errors import ConfigError, InputError, MedmergeError, OutputExistsError


def linear_cfg(*paths, **extra):
    cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}
    cfg.update(extra)
    return cfg


def assert_nothing_written(out: Path):
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.medmerge-")]
    assert leftovers == []


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of model `src` whose state dict went through `edit` (in place)."""
    copy_model(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def assert_merge_fails(inputs, out: Path, error, match: str) -> None:
    with pytest.raises(error, match=match):
        medmerge.merge(linear_cfg(*inputs), out, progress=False)
    assert_nothing_written(out)


def test_mismatched_shapes(llama_family, tmp_path):
    other = medmerge.tiny.make_model(tmp_path / "wide", seed=5, hidden=48, layers=2, vocab=64)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"shape .* the models do not share one architecture"):
        medmerge.merge(linear_cfg(llama_family["a"], other), out, progress=False)
    assert_nothing_written(out)


def test_missing_tensor_names_model_and_tensor(llama_family, tmp_path):
    broken = edited_copy(llama_family["b"], tmp_path / "broken",
                         lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    assert_merge_fails([llama_family["a"], broken], tmp_path / "out", InputError,
                       r"broken has no tensor 'model.layers.1.mlp.up_proj.weight'")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_input_is_named(llama_family, tmp_path, bad):
    def poison(state):
        state["model.layers.0.self_attn.q_proj.weight"][3, 4] = bad

    broken = edited_copy(llama_family["b"], tmp_path / "broken", poison)
    assert_merge_fails([llama_family["a"], broken], tmp_path / "out", InputError,
                       r"'model.layers.0.self_attn.q_proj.weight' of model .*broken holds 1 NaN")


def test_truncated_shard(llama_family, tmp_path):
    broken = copy_model(llama_family["b"], tmp_path / "broken")
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    assert_merge_fails([llama_family["a"], broken], tmp_path / "out", InputError,
                       r"model.safetensors: truncated: tensor .* re-download")


def test_corrupt_header(llama_family, tmp_path):
    broken = copy_model(llama_family["b"], tmp_path / "broken")
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"corrupt safetensors header"):
        medmerge.merge(linear_cfg(llama_family["a"], broken), tmp_path / "out", progress=False)
    assert n > 0


def test_unknown_method(llama_family, tmp_path):
    cfg = linear_cfg(llama_family["a"], llama_family["b"])
    cfg["merge_method"] = "frankenmerge"
    with pytest.raises(ConfigError, match=r"unknown merge method 'frankenmerge'; available: .*linear"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)


def test_unknown_parameter_names_key_and_method(llama_family, tmp_path):
    cfg = linear_cfg(llama_family["a"], llama_family["b"], parameters={"densty": 0.5})
    with pytest.raises(ConfigError, match=r"unknown parameter `densty` for method 'linear'"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)


def test_missing_required_parameter(llama_family, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(llama_family["a"])}, {"model": str(llama_family["b"])}]}
    with pytest.raises(ConfigError, match=r"needs `weight` for model .*a"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)


def test_unsupported_key_is_named(llama_family, tmp_path):
    cfg = linear_cfg(llama_family["a"], llama_family["b"])
    cfg["modules"] = {}
    with pytest.raises(ConfigError, match=r"key `modules`"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    cfg.pop("modules")
    cfg["slices"] = []  # both forms at once
    with pytest.raises(ConfigError, match=r"give either `models:` or `slices:`, not both"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    cfg = linear_cfg(llama_family["a"], llama_family["b"], mystery=1)
    with pytest.raises(ConfigError, match=r"`mystery`: unknown key"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)


def test_missing_base_for_method_that_needs_one(llama_family, tmp_path):
    cfg = {"merge_method": "ties", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 1.0}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"method 'ties' needs `base_model`"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)


def test_vocab_mismatch_without_policy_explains_choices(vocab_family, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"vocabulary sizes differ .*tokenizer_source: base.*union"):
        medmerge.merge(linear_cfg(vocab_family["base"], vocab_family["other"]), out, progress=False)
    assert_nothing_written(out)


def test_existing_output_is_kept_without_force(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"--force"):
        medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False, force=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_hub_id_offline_is_refused(llama_family, tmp_path):
    with pytest.raises(InputError, match=r"looks like a Hugging Face hub id.*local path"):
        medmerge.merge(linear_cfg(llama_family["a"], "meta-llama/Llama-3.1-8B-Instruct"), tmp_path / "out", progress=False)


def test_pickle_needs_flag(llama_family, tmp_path):
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    shutil.copy(llama_family["b"] / "config.json", pkl / "config.json")
    torch.save(load_file(llama_family["b"] / "model.safetensors"), pkl / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"pickle .*--allow-pickle"):
        medmerge.merge(linear_cfg(llama_family["a"], pkl), out, progress=False)
    assert_nothing_written(out)
    result = medmerge.merge(linear_cfg(llama_family["a"], pkl), out, progress=False, allow_pickle=True)
    assert result.verification.ok


def test_interrupted_run_leaves_nothing(llama_family, tmp_path, monkeypatch):
    import medmerge.merging.execute as execute

    calls = {"n": 0}
    real = execute.merge_loaded

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "merge_loaded", interrupt_midway)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    assert calls["n"] == 5
    assert_nothing_written(out)


@pytest.mark.slow  # a child process importing torch
def test_sigterm_mid_merge_leaves_nothing(llama_family, tmp_path):
    """A real process killed with SIGTERM while merging: no OUT, no temporary folder."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time, medmerge, medmerge.merging.execute as ex
        real = ex.merge_loaded
        def slow(*a, **k):
            print("merging", flush=True); time.sleep(0.5); return real(*a, **k)
        ex.merge_loaded = slow
        medmerge.merge({linear_cfg(llama_family['a'], llama_family['b'])!r}, {str(out)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "merging"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert_nothing_written(out)


def test_verify_detects_tampering(llama_family, tmp_path):
    out = tmp_path / "out"
    medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    assert medmerge.verify(out).ok
    f = out / "model.safetensors"
    state = load_file(f)
    state["model.norm.weight"][0] += 0.01
    from medmerge.io.checkpoint import read_safetensors_header

    header, _ = read_safetensors_header(f)
    save_file(state, f, metadata=header.get("__metadata__"))
    report = medmerge.verify(out)
    assert not report.ok
    bad = [c for c in report.checked if not c.ok]
    assert [c.name for c in bad] == ["model.norm.weight"]
    assert bad[0].max_abs == pytest.approx(0.01, rel=1e-3)


def test_verify_detects_missing_tensor_and_config_mismatch(llama_family, tmp_path):
    out = tmp_path / "out"
    medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    state = load_file(out / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    report = medmerge.verify(out)
    assert not report.ok
    text = " ".join(report.problems)
    assert "model.layers.0.mlp.down_proj.weight is missing" in text
    assert "config.json says dtype bfloat16" in text


def test_nonfinite_result_is_an_error(llama_family, tmp_path):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 1.0}},
        {"model": str(llama_family["b"]), "parameters": {"weight": -1.0}}]}
    out = tmp_path / "out"
    with pytest.raises(MedmergeError, match=r"weights of .* sum to 0"):
        medmerge.merge(cfg, out, progress=False)
    assert_nothing_written(out)


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, r"model_type 'mistral' .* 'llama'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"architectures \['LlamaForSequenceClassification'\]"),
])
def test_inputs_of_another_architecture_are_refused(llama_family, tmp_path, changes, match):
    other = _edit_config(copy_model(llama_family["b"], tmp_path / "other"), **changes)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as info:
        medmerge.merge(linear_cfg(llama_family["a"], other), out, progress=False)
    assert str(other) in str(info.value) and str(llama_family["a"]) in str(info.value)
    assert_nothing_written(out)


def test_input_without_config_json_is_refused(llama_family, tmp_path):
    bare = copy_model(llama_family["b"], tmp_path / "bare")
    (bare / "config.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"bare has no config.json"):
        medmerge.merge(linear_cfg(llama_family["a"], bare), out, progress=False)
    assert_nothing_written(out)


def test_custom_code_config_is_refused_even_with_trust_remote_code(llama_family, tmp_path):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    a = _edit_config(copy_model(llama_family["a"], tmp_path / "a"), auto_map=auto_map)
    b = _edit_config(copy_model(llama_family["b"], tmp_path / "b"), auto_map=auto_map)
    out = tmp_path / "out"
    for trust in (False, True):
        with pytest.raises(InputError, match=r"auto_map.*never runs remote code.*save_pretrained"):
            medmerge.merge(linear_cfg(a, b), out, progress=False, trust_remote_code=trust)
        assert_nothing_written(out)


def _int_copy(src: Path, dst: Path, seed: int) -> Path:
    def quantize(state):
        g = torch.Generator().manual_seed(seed)
        shape = state["model.layers.0.mlp.up_proj.weight"].shape
        state["model.layers.0.mlp.up_proj.weight"] = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    return edited_copy(src, dst, quantize)


def test_non_float_tensor_is_refused_unless_identical(llama_family, tmp_path):
    qa = _int_copy(llama_family["a"], tmp_path / "qa", seed=1)
    qb = _int_copy(llama_family["b"], tmp_path / "qb", seed=2)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"'model.layers.0.mlp.up_proj.weight' .*int8.*qb.*model.safetensors"):
        medmerge.merge(linear_cfg(qa, qb), out, progress=False)
    assert_nothing_written(out)
    # int8 in one input, float in the other: refused from the headers alone
    with pytest.raises(InputError, match=r"'model.layers.0.mlp.up_proj.weight' is int8 in .*qa"):
        medmerge.merge(linear_cfg(qa, llama_family["b"]), out, progress=False)
    assert_nothing_written(out)
    # the bit-identical integer tensor in every input is copied
    same = _int_copy(llama_family["b"], tmp_path / "same", seed=1)
    result = medmerge.merge(linear_cfg(qa, same), out, progress=False)
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
                       load_file(qa / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])
    assert result.verification.ok


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_must_be_positive(llama_family, tmp_path, threads):
    import yaml
    from typer.testing import CliRunner

    from medmerge.cli import app

    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(yaml.safe_dump(linear_cfg(llama_family["a"], llama_family["b"])))
    result = CliRunner().invoke(app, ["merge", str(cfg_file), str(tmp_path / "out"), "-q", "--threads", threads])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "--threads" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="threads"):
        medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), tmp_path / "out", progress=False,
                       threads=int(threads))
    assert_nothing_written(tmp_path / "out")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(llama_family, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(llama_family["b"] / "config.json", evil / "config.json")
    state = load_file(llama_family["b"] / "model.safetensors")
    state["extra"] = _Payload(marker)
    torch.save(state, evil / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"pytorch_model.bin is not a plain tensor checkpoint; nothing was executed"):
        medmerge.merge(linear_cfg(llama_family["a"], evil), out, progress=False, allow_pickle=True)
    assert not marker.exists()
    assert_nothing_written(out)


def test_verify_json_is_not_overwritten_without_force(llama_family, tmp_path):
    from typer.testing import CliRunner

    from medmerge.cli import app

    out = tmp_path / "out"
    medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    report = tmp_path / "report.json"
    report.write_text("precious")
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(out), "-q", "--json", str(report)])
    assert result.exit_code == 2 and "--force" in result.output, result.output
    assert report.read_text() == "precious"
    result = runner.invoke(app, ["verify", str(out), "-q", "--json", str(report), "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["ok"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_a_weights_file_given_as_the_model_names_its_folder(llama_family):
    from medmerge.io.checkpoint import resolve_model_path

    with pytest.raises(InputError, match=r"is a file; pass the model folder that holds it"):
        resolve_model_path(str(llama_family["a"] / "model.safetensors"))


# ---- hostile inputs from the QA campaign: each is a clear error, never a silently different merge --------------


def test_duplicate_yaml_key_is_refused_naming_key_and_lines(llama_family, tmp_path):
    """M04: a second `models:` used to replace the first silently."""
    from medmerge.settings import read_yaml

    a, b = llama_family["a"], llama_family["b"]
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.9}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.1}}\n"
            f"models:\n  - model: {a}\n    parameters: {{weight: 0.1}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.9}}\n")
    cfg = tmp_path / "m.yml"
    cfg.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"m.yml: key 'models' appears twice \(lines 2 and 7\)"):
        medmerge.merge(cfg, out, progress=False)
    assert_nothing_written(out)
    with pytest.raises(ConfigError, match=r"key 'models' appears twice"):
        medmerge.merging.parse_config(text)
    # every config medmerge reads (training, sweeps, experiments) goes through read_yaml; nested keys count too
    other = tmp_path / "train.yml"
    other.write_text("stage: sft\ntraining:\n  lr: 1.0e-3\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"train.yml: key 'lr' appears twice \(lines 3 and 4\)"):
        read_yaml(other, "training config")
    # YAML merge keys (<<) are not duplicates: the explicit key overrides the merged one
    other.write_text("base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n")
    assert read_yaml(other, "training config")["run"] == {"lr": 2}


def test_the_same_model_spelled_two_ways_is_refused(llama_family, tmp_path):
    """M11: `a` and `a/.` are one folder; the duplicate check compared strings."""
    a = llama_family["a"]
    for twin in (f"{a}/.", f"{a}/", f"{a}/../{a.name}"):
        cfg = linear_cfg(a, twin)
        with pytest.raises(ConfigError, match=r"listed twice"):
            medmerge.merge(cfg, tmp_path / "out", progress=False)
    link = tmp_path / "alias"
    link.symlink_to(a)
    with pytest.raises(ConfigError, match=r"alias.* the same folder"):
        medmerge.merge(linear_cfg(a, link), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_base_model_spelled_differently_is_the_listed_model(llama_family, tmp_path):
    """M12: `base_model: base/` with `base` in models used to add the base as an extra (zero) task vector."""
    from medmerge.merging.api import load_plan

    base, a = llama_family["base"], llama_family["a"]
    cfg = {"merge_method": "task_arithmetic", "base_model": f"{base}/", "parameters": {"normalize": True},
           "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                      {"model": str(a), "parameters": {"weight": 1.0}}]}
    plan = load_plan(cfg)
    assert len(plan.models) == 2 and plan.base == 0
    out = tmp_path / "out"
    medmerge.merge(cfg, out, progress=False)
    merged, want = load_file(out / "model.safetensors"), load_file(a / "model.safetensors")
    for k in want:  # the base is the base (no task vector of its own): base + (a - base) * 1/1 = a
        torch.testing.assert_close(merged[k], want[k])
    import yaml
    record = yaml.safe_load((out / "medmerge.yml").read_text())
    assert record["base_model"] == str(base) and len(record["models"]) == 2


def test_output_given_with_a_tilde_is_under_home(llama_family, tmp_path, monkeypatch):
    """M19: OUT '~/merged' (quoted, so the shell did not expand it) wrote a literal ./~/merged."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    result = medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), "~/merged", progress=False)
    assert (home / "merged" / "model.safetensors").is_file()
    assert not (cwd / "~").exists()
    assert result.out == home / "merged"


@pytest.mark.parametrize("size", ["0", "0.4", 0, "999"])
def test_a_shard_size_below_one_kilobyte_is_refused(llama_family, tmp_path, size):
    """M20: --shard-size 0 (or "0.4", 0 bytes) wrote one shard per tensor."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"shard size .* at least 1KB"):
        medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, shard_size=size, progress=False)
    assert_nothing_written(out)


def test_config_json_that_is_not_an_object_is_named(llama_family, tmp_path):
    """M29: an input config.json holding a JSON list raised AttributeError."""
    odd = copy_model(llama_family["b"], tmp_path / "odd")
    (odd / "config.json").write_text("[1, 2, 3]")
    assert_merge_fails([llama_family["a"], odd], tmp_path / "out", InputError,
                       r"odd/config.json: expected a JSON object .* got a list")


@pytest.mark.parametrize("value", ["two", 2.5, True, -1, None, [2]])
def test_layer_count_that_is_not_a_count_is_named(llama_family, tmp_path, value):
    """M30: num_hidden_layers "two" raised ValueError from int()."""
    odd = _edit_config(copy_model(llama_family["b"], tmp_path / "odd"), num_hidden_layers=value)
    assert_merge_fails([llama_family["a"], odd], tmp_path / "out", InputError,
                       r"odd/config.json: num_hidden_layers .* is not a (whole number|non-negative)")


def test_layer_count_that_contradicts_the_tensors_is_refused(llama_family, tmp_path):
    """M31: config.json saying 1 layer while tensors hold 2 put layer 0 at the end of a gradient."""
    a = _edit_config(copy_model(llama_family["a"], tmp_path / "a1"), num_hidden_layers=1)
    b = _edit_config(copy_model(llama_family["b"], tmp_path / "b1"), num_hidden_layers=1)
    cfg = {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(a), "parameters": {"weight": [0.0, 1.0]}},
        {"model": str(b), "parameters": {"weight": [1.0, 0.0]}}]}
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"a1/config.json: num_hidden_layers 1 does not match the tensors, "
                                         r"which hold 2 layers \(model.layers.0 to model.layers.1\)"):
        medmerge.merge(cfg, out, progress=False)
    assert_nothing_written(out)


def test_verify_of_a_record_that_is_not_a_mapping_or_a_config_list(llama_family, tmp_path):
    """V01, V02, V06: a medmerge.yml that is a list or empty, an output config.json that is a list."""
    from medmerge.adapters.verify import verify_output

    out = tmp_path / "out"
    medmerge.merge(linear_cfg(llama_family["a"], llama_family["b"]), out, progress=False)
    record = (out / "medmerge.yml").read_text()
    for text, kind in (("- 1\n- 2\n", "a list"), ("", "empty"), ("# only a comment\n", "empty")):
        (out / "medmerge.yml").write_text(text)
        with pytest.raises(InputError, match=rf"medmerge.yml: .*is {kind}"):
            verify_output(out)
    (out / "medmerge.yml").write_text(record)
    (out / "config.json").write_text("[]")
    with pytest.raises(InputError, match=r"out/config.json: expected a JSON object"):
        verify_output(out)
