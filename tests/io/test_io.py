"""The io layer on its own: sizes, record files, hashes and the recorded-base check, folder checks."""

import hashlib
import json

import pytest

import medmerge
from medmerge.errors import InputError
from medmerge.io.fingerprint import check_recorded_base, files_sha256, fingerprint, sha256_file
from medmerge.io.folders import check_model, copy_support_files, with_dtype
from medmerge.io.records import DataError, read_json, read_jsonl, read_table, require_columns
from medmerge.io.writer import parse_size


def test_parse_size_is_bytes():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(medmerge.MedmergeError, match="e.g. 5GB"):
        parse_size("five")


def test_sha256_of_one_file_and_of_several_by_hand(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.json"
    a.write_bytes(b"weights")
    b.write_text("{}")
    assert sha256_file(a) == hashlib.sha256(b"weights").hexdigest()
    h = hashlib.sha256()
    for f in (a, b):  # sorted by path, each as name NUL digest
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    assert files_sha256([b, a]) == h.hexdigest()


def test_recorded_base_check_names_both_fingerprints_and_the_fix(llama_family):
    base = llama_family["base"]
    assert check_recorded_base(base, fingerprint(base), trained="adapter x", fix="unused") == fingerprint(base)
    other = fingerprint(llama_family["a"])
    with pytest.raises(InputError, match=rf"base model .* is not the one adapter x was trained on: its recorded base "
                                         rf"fingerprint {other[:12]}\.\.\. differs .*; pass the right one"):
        check_recorded_base(base, other, trained="adapter x", fix="pass the right one")


def test_record_readers_name_file_line_and_column(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2, "b": 3}\n')
    assert read_jsonl(f) == [{"a": 1}, {"a": 2, "b": 3}]
    with pytest.raises(DataError, match=r"rows.jsonl, record 1: missing column\(s\) 'b' \(columns found: a\)"):
        require_columns(read_jsonl(f), ["b"], f)
    f.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"rows.jsonl, line 2: not valid JSON"):
        read_jsonl(f)
    csv = tmp_path / "rows.csv"
    csv.write_text("x,y\n1,2\n")
    assert read_table(csv) == [{"x": "1", "y": "2"}]
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_table(tmp_path / "rows.txt")
    j = tmp_path / "obj.json"
    j.write_text("[1, 2]")
    with pytest.raises(DataError, match="obj.json: expected a mapping"):
        read_json(j, dict, "a mapping")


def test_model_folder_checks_and_support_files(llama_family, tmp_path):
    assert check_model(llama_family["base"]) == llama_family["base"].resolve()
    with pytest.raises(InputError, match="has no config.json"):
        empty = tmp_path / "empty"
        empty.mkdir()
        check_model(empty)
    import torch

    config = json.loads((llama_family["base"] / "config.json").read_text())
    assert with_dtype(config, torch.bfloat16)["dtype"] == "bfloat16"
    assert with_dtype(config, None) == config
    copy_support_files(llama_family["base"], tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert not (tmp_path / "config.json").exists()  # support files only: the config is written by the exporter


# ---- hostile inputs from the QA campaign ------------------------------------------------------------------------


def test_sizes_of_zero_bytes_and_shards_below_a_kilobyte_are_refused():
    """M20: '--shard-size 0' (or '0.4', which is 0 bytes) silently wrote one shard per tensor."""
    from medmerge.io.writer import shard_size

    for text in ("0", "0.4", "0GB", "0.0000000001KB"):
        with pytest.raises(InputError, match=r"is 0 bytes"):
            parse_size(text)
    for value in ("0", 0, "999", 999, "5", True, -1, 2.5):
        with pytest.raises(InputError, match=r"shard size .* at least 1KB"):
            shard_size(value)
    assert shard_size("1KB") == 1000 and shard_size("5GB") == 5 * 10**9 and shard_size(20_000) == 20_000


def _st_header(path):
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path, header, data):
    import struct

    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("field, value, match", [
    ("shape", [-32, -32], r"shape \[-32, -32\] .*non-negative whole numbers"),
    ("shape", [32.0, 32], r"shape \[32.0, 32\] .*non-negative whole numbers"),
    ("shape", [True, 32], r"non-negative whole numbers"),
    ("shape", "32x32", r"non-negative whole numbers"),
    ("dtype", ["F32"], r"unsupported dtype \['F32'\]"),
    ("data_offsets", [0.0, 4096.0], r"data_offsets .* two non-negative whole numbers"),
    ("data_offsets", [4096, 0], r"data_offsets .* two non-negative whole numbers"),
])
def test_safetensors_header_entries_that_are_not_counts_are_named(llama_family, tmp_path, field, value, match):
    """M24, M25: negative or float shape entries reached torch.empty (RuntimeError, TypeError)."""
    import shutil

    from medmerge.io.checkpoint import scan_safetensors

    folder = tmp_path / "m"
    shutil.copytree(llama_family["a"], folder)
    f = folder / "model.safetensors"
    header, data = _st_header(f)
    name = "model.layers.0.self_attn.q_proj.weight"
    header[name][field] = value
    _st_write(f, header, data)
    with pytest.raises(InputError, match=rf"model.safetensors: tensor '{name}' (has )?.*{match}"):
        scan_safetensors(f)


def test_a_tensor_in_two_files_without_an_index_is_refused(llama_family, tmp_path):
    """M28: a stray model_backup.safetensors (another model's tensors) was silently merged instead."""
    import shutil

    from medmerge.io.checkpoint import INDEX_NAME, Checkpoint

    folder = tmp_path / "m"
    shutil.copytree(llama_family["a"], folder)
    shutil.copy(llama_family["b"] / "model.safetensors", folder / "model_backup.safetensors")
    with pytest.raises(InputError, match=r"tensor '.*' is in both model.safetensors and model_backup.safetensors"
                                         r".*no model.safetensors.index.json"):
        Checkpoint(folder)
    # with an index, only the files it names count: the stray file is ignored
    names = list(Checkpoint(llama_family["a"]).records)
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    ckpt = Checkpoint(folder)
    assert {r.file.name for r in ckpt.records.values()} == {"model.safetensors"}
    # an index that names both files for a tensor in both: the one it names is read
    wm = {n: "model.safetensors" for n in names}
    wm[names[0]] = "model_backup.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    assert Checkpoint(folder).records[names[0]].file.name == "model_backup.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(InputError, match=r"invalid index.*'weight_map' must map"):
        Checkpoint(folder)


def test_a_config_json_that_is_not_an_object_is_named(llama_family, tmp_path):
    """M29, V06: config.json holding a JSON list raised AttributeError wherever it was read."""
    import shutil

    from medmerge.io.checkpoint import Checkpoint

    folder = tmp_path / "m"
    shutil.copytree(llama_family["a"], folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"m/config.json: expected a JSON object .* got a list"):
        Checkpoint(folder)
