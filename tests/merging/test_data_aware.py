"""`medmerge stats` and the data-aware merges (regmean, fisher) against independent computations.

The statistics are recomputed here another way: gram matrices from inputs captured one example at a time
(no padding, a plain forward hook), Fisher values from `torch.autograd.grad` per example. The merges are
checked against the papers' formulas in float64 and against RegMean's defining property (the merged layer
minimises the summed squared output error over the calibration inputs, so the gradient of that error is 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmerge.cli import app
from medmerge.errors import ConfigError, InputError
from medmerge.io.stats import StatsFolder
from medmerge.merging import merge
from medmerge.tiny import make_model, tokenizer_words
from medmerge.training.data import IGNORE
from medmerge.training.stats import calibration_examples, collect_stats

F64 = torch.float64
Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Two fine-tunes a, b of one tiny Llama, a mixed calibration file, and each model's statistics."""
    root = tmp_path_factory.mktemp("stats")
    base = make_model(root / "base", seed=0, hidden=32, layers=2, vocab=64)
    models = {n: make_model(root / n, base=base, seed=s, delta_scale=0.05) for n, s in (("a", 1), ("b", 2))}
    words = tokenizer_words(64)
    rows = [{"text": " ".join(words[4 + (i * 7 + j) % 55] for j in range(6 + i))} for i in range(7)]
    rows += [{"prompt": " ".join(words[10 + i:16 + i]), "response": " ".join(words[30 - i:36 - i])} for i in range(3)]
    data = root / "cal.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = {n: root / f"stats_{n}" for n in models}
    for n, m in models.items():
        collect_stats(m, data, stats[n], batch_size=4, progress_bar=False)
    return {"root": root, "models": models, "data": data, "stats": stats}


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(path))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_gram_is_the_inner_product_of_the_layer_inputs_over_every_token(calibrated):
    model, tok = _load(calibrated["models"]["a"])
    examples = calibration_examples(tok, [json.loads(x) for x in calibrated["data"].read_text().split("\n") if x],
                                    512, calibrated["data"])
    captured = {}
    names = {"model.layers.0.self_attn.q_proj": [], "model.layers.0.self_attn.v_proj": [],
             "model.layers.1.mlp.down_proj": []}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: names[n].append(args[0][0].detach().to(F64))) for n in names]
    with torch.no_grad():
        for ex in examples:  # one at a time: no padding to mask
            model(input_ids=torch.tensor([ex["input_ids"]]))
    for h in hooks:
        h.remove()
    stats = StatsFolder(calibrated["stats"]["a"])
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    assert stats.record["tokens"] == tokens
    for n, xs in names.items():
        x = torch.cat(xs)
        captured[n] = x.T @ x / tokens
        torch.testing.assert_close(stats.read("gram", f"{n}.weight").to(F64), captured[n], rtol=1e-5, atol=1e-6)
    # q/k/v read one input: one accumulator while collecting, the same matrix stored under each name
    assert stats.record["shared_inputs"]["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert "gram/model.embed_tokens.weight" not in stats.records and "gram/lm_head.weight" in stats.records


def test_fisher_is_the_mean_squared_per_example_gradient(calibrated):
    model, tok = _load(calibrated["models"]["b"])
    examples = calibration_examples(tok, [json.loads(x) for x in calibrated["data"].read_text().split("\n") if x],
                                    512, calibrated["data"])
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n], dtype=F64) for n in (Q, DOWN, "model.embed_tokens.weight")}
    used = 0
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        if not (labels[:, 1:] != IGNORE).any():
            continue
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, [params[n] for n in want])
        for n, g in zip(want, grads):
            want[n] += g.to(F64) ** 2
        used += 1
    stats = StatsFolder(calibrated["stats"]["b"])
    assert stats.record["fisher_examples"] == used == len(examples)
    for n, w in want.items():
        torch.testing.assert_close(stats.read("fisher", n).to(F64), w / used, rtol=1e-4, atol=1e-12)


def _config(calibrated, method, **params):
    return {"merge_method": method, "parameters": params, "models": [
        {"model": str(calibrated["models"][n]), "parameters": {"stats": str(calibrated["stats"][n]), "weight": w}}
        for n, w in (("a", 1.0), ("b", 3.0))]}


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_solves_the_weighted_least_squares_of_the_paper(calibrated, tmp_path, alpha):
    merge(_config(calibrated, "regmean", reduce_non_diagonal_ratio=alpha), tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    wa, wb = (_weights(calibrated["models"][n]) for n in ("a", "b"))
    ga, gb = (StatsFolder(calibrated["stats"][n]) for n in ("a", "b"))
    for name in (Q, DOWN, "lm_head.weight"):
        grams = []
        for g in (ga.read("gram", name).to(F64), gb.read("gram", name).to(F64)):
            off = g * alpha
            off.diagonal().copy_(g.diagonal())
            grams.append(off)
        lhs = 1.0 * grams[0] + 3.0 * grams[1]
        rhs = 1.0 * grams[0] @ wa[name].to(F64).T + 3.0 * grams[1] @ wb[name].to(F64).T
        expected = torch.linalg.solve(lhs, rhs).T
        torch.testing.assert_close(out[name].to(F64), expected, rtol=2e-4, atol=2e-5)
        # the defining property: sum_i lambda_i G~_i (W - W_i)^T = 0 (zero gradient of the output error)
        residual = 1.0 * grams[0] @ (out[name].to(F64) - wa[name].to(F64)).T + \
            3.0 * grams[1] @ (out[name].to(F64) - wb[name].to(F64)).T
        assert residual.abs().max() < 1e-4 * rhs.abs().max()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        torch.testing.assert_close(out[name], (wa[name] + 3 * wb[name]) / 4, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_merge_is_the_fisher_weighted_mean(calibrated, tmp_path, normalize):
    merge(_config(calibrated, "fisher", fisher_floor=1e-6, normalize=normalize), tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    wa, wb = (_weights(calibrated["models"][n]) for n in ("a", "b"))
    fa, fb = (StatsFolder(calibrated["stats"][n]) for n in ("a", "b"))
    # normalize: each model's Fisher over its norm across every parameter (recomputed here from the tensors)
    norm = {id(f): (sum(f.read("fisher", n[7:]).double().square().sum() for n in f.records
                        if n.startswith("fisher/")) ** 0.5).item()
            if normalize else None for f in (fa, fb)}
    assert not normalize or norm[id(fa)] == pytest.approx(fa.record["fisher_norm"], rel=1e-6)
    scale = {id(f): 1.0 / (norm[id(f)] + 1e-6) if normalize else 1.0 for f in (fa, fb)}
    for name in (Q, DOWN, "model.embed_tokens.weight", "model.norm.weight"):
        ca = 1.0 * scale[id(fa)] * (fa.read("fisher", name).to(F64) + 1e-6)
        cb = 3.0 * scale[id(fb)] * (fb.read("fisher", name).to(F64) + 1e-6)
        expected = (ca * wa[name].to(F64) + cb * wb[name].to(F64)) / (ca + cb)
        torch.testing.assert_close(out[name].to(F64), expected, rtol=1e-5, atol=1e-7)
    if normalize:
        return
    # rows of tokens no example used have Fisher 0 in both: the floor makes them the weighted mean
    unused = (fa.read("fisher", "model.embed_tokens.weight").sum(1) == 0) & \
        (fb.read("fisher", "model.embed_tokens.weight").sum(1) == 0)
    assert unused.any()
    e = "model.embed_tokens.weight"
    torch.testing.assert_close(out[e][unused], ((wa[e] + 3 * wb[e]) / 4)[unused], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_model_merged_with_itself_is_itself_and_verify_replans_from_the_record(calibrated, tmp_path, method):
    a, sa = calibrated["models"]["a"], calibrated["stats"]["a"]
    cfg = {"merge_method": method, "models": [{"model": str(a), "parameters": {"stats": str(sa)}},
                                              {"model": str(a), "parameters": {"stats": str(sa), "weight": 2.0}}]}
    with pytest.raises(ConfigError, match="listed twice"):
        merge(cfg, tmp_path / "same", progress=False)  # one model twice is refused as elsewhere...
    b = calibrated["root"] / f"a_copy_{method}"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    cfg["models"][1]["model"] = str(b)  # ...a copy (same fingerprint, so a's statistics fit it) is not
    merge(cfg, tmp_path / "out", progress=False)
    out, wa = _weights(tmp_path / "out"), _weights(a)
    for name in wa:
        torch.testing.assert_close(out[name], wa[name], rtol=2e-4, atol=2e-5)
    resolved = (tmp_path / "out" / "medmerge.yml").read_text()
    assert str(sa.resolve()) in resolved and "statistics:" in resolved
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_statistics_of_another_model_or_kind_are_refused_before_merging(calibrated, tmp_path):
    cfg = _config(calibrated, "regmean")
    cfg["models"][1]["parameters"]["stats"] = str(calibrated["stats"]["a"])  # a's statistics given for b
    with pytest.raises(InputError, match="computed on .*not on input"):
        merge(cfg, tmp_path / "x", progress=False)
    gram_only = tmp_path / "gram_only"
    collect_stats(calibrated["models"]["b"], calibrated["data"], gram_only, kinds=["gram"], progress_bar=False)
    cfg = _config(calibrated, "fisher")
    cfg["models"][1]["parameters"]["stats"] = str(gram_only)
    with pytest.raises(InputError, match="holds gram statistics.*needs fisher"):
        merge(cfg, tmp_path / "y", progress=False)
    cfg["models"][1]["parameters"].pop("stats")
    with pytest.raises(ConfigError, match="needs `stats` for model"):
        merge(cfg, tmp_path / "z", progress=False)
    cfg["models"][1]["parameters"]["stats"] = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match="does not exist"):
        merge(cfg, tmp_path / "z", progress=False)
    assert not any(p.name in ("x", "y", "z") for p in tmp_path.iterdir())


def test_gram_batches_with_padding_equal_one_example_at_a_time(calibrated, tmp_path):
    collect_stats(calibrated["models"]["a"], calibrated["data"], tmp_path / "one", kinds=["gram"], batch_size=1,
                  progress_bar=False)
    one, four = StatsFolder(tmp_path / "one"), StatsFolder(calibrated["stats"]["a"])
    assert one.record["tokens"] == four.record["tokens"]
    for key in one.records:
        torch.testing.assert_close(one._checkpoint.read(key), four._checkpoint.read(key), rtol=1e-5, atol=1e-6)


def test_stats_cli_and_its_errors(calibrated, tmp_path):
    runner = CliRunner()
    a = calibrated["models"]["a"]
    ok = runner.invoke(app, ["stats", str(a), "--data", str(calibrated["data"]), "--out", str(tmp_path / "s"),
                             "--kinds", "gram", "--limit", "4", "-q"])
    assert ok.exit_code == 0, ok.output
    rec = json.loads((tmp_path / "s" / "medmerge_stats.json").read_text())
    assert rec["records"] == 4 and rec["kinds"] == ["gram"] and rec["data_sha256"]
    docs = tmp_path / "docs.txt"
    docs.write_text("a b c d\ne f g\nh i j k l\n")
    mixed = runner.invoke(app, ["stats", str(a), "--data", f"{calibrated['data']}:4", "--data", f"{docs}:2",
                                "--out", str(tmp_path / "mix"), "--kinds", "fisher", "-q"])
    assert mixed.exit_code == 0, mixed.output
    rec = json.loads((tmp_path / "mix" / "medmerge_stats.json").read_text())
    assert [(p["records"], p["taken"]) for p in rec["data_parts"]] == [(10, 4), (3, 2)] and rec["records"] == 6
    assert rec["fisher_examples"] == 6 and len(rec["data_sha256"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"question": "no usable field"}\n')
    cases = [
        (["--data", str(bad)], "record 2: a calibration record needs"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(calibrated["data"]), "--kinds", "hessian"], "choose among gram, fisher"),
        (["--data", str(calibrated["data"]), "--max-length", "1"], "--max-length must be"),
    ]
    for extra, message in cases:
        r = runner.invoke(app, ["stats", str(a), *extra, "--out", str(tmp_path / "t"), "-q"])
        assert r.exit_code != 0 and message in " ".join(r.output.split()), (extra, r.output)
        assert "Traceback" not in r.output
    exists = runner.invoke(app, ["stats", str(a), "--data", str(calibrated["data"]), "--out", str(tmp_path / "s")])
    assert exists.exit_code != 0 and "--force" in exists.output
    into_model = runner.invoke(app, ["stats", str(a), "--data", str(calibrated["data"]), "--out", str(a), "--force"])
    assert into_model.exit_code != 0 and (a / "model.safetensors").is_file()  # --force never deletes an input
