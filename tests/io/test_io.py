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
