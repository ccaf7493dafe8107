"""`model: BASE+ADAPTER` in merge configs: the adapter applied exactly into a cached full model before planning.

Checked against (1) the same merge on a folder made by `medmerge adapters merge` (bit for bit), (2) mergekit 0.1.5's
own `model+lora` handling (PEFT's merge_and_unload into its lora_merge_cache; within 1e-6), and (3) the cache:
keyed by both fingerprints, reused, rebuilt when the adapter changes, shared by processes started at one instant.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge
from medmerge.adapters.materialize import RECORD, materialize
from medmerge.adapters.merge import merge_adapters
from medmerge.errors import InputError
from medmerge.io.checkpoint import split_lora_ref


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _lora(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)).save_pretrained(str(out))
    return out


@pytest.fixture()
def lora(llama_family, tmp_path):
    return _lora(llama_family["a"], tmp_path / "lora", seed=1)


def _cfg(f, lora_path: Path) -> dict:
    return {"merge_method": "ties", "base_model": str(f["base"]), "dtype": "float32",
            "models": [{"model": f"{f['a']}+{lora_path}", "parameters": {"weight": 0.6, "density": 0.6}},
                       {"model": str(f["b"]), "parameters": {"weight": 0.4, "density": 0.8}}]}


def test_a_model_plus_lora_reference_merges_like_the_adapter_merged_folder(llama_family, lora, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("MEDMERGE_LORA_CACHE", str(tmp_path / "cache"))
    f = llama_family
    medmerge.merge(_cfg(f, lora), tmp_path / "out", progress=False)
    merge_adapters(f["a"], [(lora, 1.0)], tmp_path / "a_lora", progress=False)  # what `adapters merge` writes
    by_hand = {**_cfg(f, lora)}
    by_hand["models"] = [{**by_hand["models"][0], "model": str(tmp_path / "a_lora")}, by_hand["models"][1]]
    medmerge.merge(by_hand, tmp_path / "by_hand", progress=False)
    out, ref = _load(tmp_path / "out"), _load(tmp_path / "by_hand")
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in out)
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    rec = json.loads((entry / RECORD).read_text())
    assert rec["adapter"]["path"] == str(lora.resolve()) and len(rec["key"]) == 24
    assert f"{f['a']}+{lora}" in (tmp_path / "out" / "medmerge.yml").read_text()  # the reference as written
    assert medmerge.verify(tmp_path / "out").ok  # re-planned from medmerge.yml: the cached application is reused


def test_model_plus_lora_matches_mergekit(llama_family, lora, tmp_path, monkeypatch):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    monkeypatch.setenv("MEDMERGE_LORA_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(llama_family, lora)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu",
                           lora_merge_cache=str(tmp_path / "mk_cache"), lora_merge_dtype="float32"))
    medmerge.merge(cfg, tmp_path / "mm", progress=False)
    mk, mm = _load(tmp_path / "mk"), _load(tmp_path / "mm")
    assert sorted(mk) == sorted(mm)
    worst = max((mk[k].double() - mm[k].double()).abs().max().item() for k in mk)
    assert worst <= 1e-6, worst


def test_the_cache_is_reused_and_rebuilt_when_the_adapter_changes(llama_family, lora, tmp_path):
    cache = tmp_path / "cache"
    first = materialize(Path(llama_family["a"]), lora, cache)
    stamp = (first / RECORD).stat().st_mtime_ns
    assert materialize(Path(llama_family["a"]), lora, cache) == first
    assert (first / RECORD).stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = _lora(llama_family["a"], tmp_path / "lora2", seed=2)
    second = materialize(Path(llama_family["a"]), other, cache)
    assert second != first and _load(second)["model.layers.0.self_attn.q_proj.weight"].ne(
        _load(first)["model.layers.0.self_attn.q_proj.weight"]).any()


def _materialize_in_a_process(base, adapter, cache, barrier, results):
    barrier.wait(timeout=60)
    try:
        results.put(str(materialize(Path(base), Path(adapter), Path(cache))))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(f"failed: {type(e).__name__}: {e}")


def test_processes_started_together_build_one_entry_and_all_read_it(llama_family, lora, tmp_path):
    ctx, n = mp.get_context("fork"), 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    args = (str(llama_family["a"]), str(lora), str(tmp_path / "cache"), barrier, results)
    procs = [ctx.Process(target=_materialize_in_a_process, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(got)) == 1 and not got[0].startswith("failed"), got
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / RECORD).is_file()


def test_lora_reference_parsing_and_errors(llama_family, lora, tmp_path):
    a = str(llama_family["a"])
    assert split_lora_ref(f"{a}+{lora}") == (a, str(lora))
    assert split_lora_ref(a) is None
    plus = tmp_path / "odd+name"
    plus.mkdir()
    assert split_lora_ref(str(plus)) is None  # a folder whose name has a '+' is a plain reference
    cfg = _cfg(llama_family, tmp_path / "missing_adapter")
    with pytest.raises(InputError, match="missing_adapter.* does not exist"):
        medmerge.merge(cfg, tmp_path / "out", progress=False)
    wrong_base = _lora(llama_family["b"], tmp_path / "lora_b", seed=3)  # trained on b, applied to a
    (wrong_base / "medmerge_train.json").write_text(json.dumps(
        {"base": {"fingerprint": "0" * 64}}))  # a recorded base that is not a's
    with pytest.raises(InputError, match="base"):
        medmerge.merge(_cfg(llama_family, wrong_base), tmp_path / "out2", progress=False)
