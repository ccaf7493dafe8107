"""MedCare: routed noise experts, the orthogonality penalty, stage transitions, export, bad input.

Hand computations check the layer (top-2 routing, the knowledge path alone), the
penalty's gradients are checked on both A matrices, stage 2 is checked to start
from stage 1's knowledge aggregator with attention frozen, and the folded export is
checked on logits against the unfolded module model.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medmerge.errors import ConfigError, InputError, OutputExistsError
from medmerge.medcare.config import AlignmentSettings, ModuleSettings, load_stage_config
from medmerge.medcare.export import export
from medmerge.medcare.layer import MedCareLinear
from medmerge.medcare.model import MedCareModel, check_architecture, generator
from medmerge.medcare.train import run_stage1, run_stage2
from medmerge.tiny import BASE_WORDS, make_model

TRAIN = {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "logging_steps": 2, "threads": 1, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medcare")
    make_model(root / "base", arch="llama", seed=0, hidden=64, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(BASE_WORDS) for _ in range(40)) for _ in range(60)))
    with open(root / "sft.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"prompt": "summarize the note",
                                "response": " ".join(rng.choice(BASE_WORDS) for _ in range(6))}) + "\n")
    return root


def _stage1_cfg(world: Path, **kw):
    raw = {"model": str(world / "base"), "chat_template": "chatml", "max_seq_length": 64, "training": dict(TRAIN),
           "data": [{"path": str(world / "text.txt"), "stage": "pt"}, {"path": str(world / "sft.jsonl")}], **kw}
    return load_stage_config("stage1", None, raw=raw)


def _stage2_cfg(world: Path, stage1: Path, **kw):
    raw = {"stage1": str(stage1), "chat_template": "chatml", "max_seq_length": 64, "training": dict(TRAIN),
           "data": {"path": str(world / "sft.jsonl")}, **kw}
    return load_stage_config("stage2", None, raw=raw)


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stage1"
    run_stage1(_stage1_cfg(world, training={**TRAIN, "save_steps": 4}), out, progress=False)
    return out


class Capture:
    """A Trainer callback keeping copies of chosen tensors at the start and the end of training."""

    def __init__(self, pick):
        from transformers import TrainerCallback

        self.pick, self.begin, self.end = pick, {}, {}
        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.begin = {k: v.detach().clone() for k, v in outer.pick(model).items()}
                outer.grad = {n for n, p in model.named_parameters() if p.requires_grad}

            def on_train_end(self, args, state, control, model=None, **kw):
                outer.end = {k: v.detach().clone() for k, v in outer.pick(model).items()}

        self.callback = _CB()


@pytest.fixture(scope="module")
def stage2(world, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage2"
    capture = Capture(lambda m: {n: p for n, p in m.named_parameters()
                                 if n.endswith((".ka_A", ".ka_B")) or "self_attn" in n})
    run_stage2(_stage2_cfg(world, stage1, training={**TRAIN, "max_steps": 12}), out, progress=False,
               callbacks=(capture.callback,))
    return out, capture


def _layer(seed=0, experts=4, top_k=2, d_in=12, d_out=10):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True)
    layer = MedCareLinear(base, shared="ka", rank=3, scaling=2.0, dropout=0.0, generator=generator(seed, "t"))
    layer.add_noise_experts(experts, 2, top_k, generator(seed, "n"))
    with torch.no_grad():  # B starts at zero; give every path an effect
        layer.ka_B.normal_()
        layer.noise_B.normal_()
    return layer.eval()


def test_routing_keeps_exactly_the_top_2_renormalised_and_matches_a_hand_computation():
    layer = _layer()
    x = torch.randn(5, 7, 12)
    gates = layer.gates(x)
    probs = torch.softmax(x @ layer.router.weight.T + layer.router.bias, dim=-1)
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(5, 7))
    top = probs.topk(2, dim=-1)
    assert torch.equal(gates.topk(2, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)
    assert torch.allclose(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    # y = W0 x + b + s B_KA A_KA x + sum over the chosen experts of p_i s B_i A_i x, token by token
    y = layer(x)
    for b in range(5):
        for t in range(7):
            v = x[b, t]
            want = layer.weight @ v + layer.bias + 2.0 * layer.ka_B @ (layer.ka_A @ v)
            p = probs[b, t]
            chosen = p.topk(2).indices
            for i in chosen:
                want = want + (p[i] / p[chosen].sum()) * 2.0 * layer.noise_B[:, i] @ (layer.noise_A[i] @ v)
            assert torch.allclose(y[b, t], want, atol=1e-5)


def test_top_k_1_and_all_experts():
    x = torch.randn(3, 12)
    one = _layer(top_k=1)
    assert ((one.gates(x) > 0).sum(-1) == 1).all() and torch.allclose(one.gates(x).max(-1).values, torch.ones(3))
    every = _layer(top_k=4)
    assert torch.allclose(every.gates(x), torch.softmax(every.router(x), -1))
    with pytest.raises(ValueError, match="top_k=5"):
        _layer(top_k=5)


def test_dropping_the_noise_experts_leaves_the_knowledge_path_unchanged():
    layer = _layer()
    x = torch.randn(4, 12)
    with torch.no_grad():
        noise = sum(layer.gates(x)[:, i:i + 1] * 2.0 * (x @ layer.noise_A[i].T @ layer.noise_B[:, i].T)
                    for i in range(4))
        with_noise = layer(x)
        knowledge = x @ layer.weight.T + layer.bias + 2.0 * x @ layer.ka_A.T @ layer.ka_B.T
        layer.drop_noise_experts()
        without = layer(x)
    assert torch.allclose(without, knowledge, atol=1e-6)
    assert torch.allclose(with_noise - noise, without, atol=1e-5)
    assert not torch.allclose(with_noise, without, atol=1e-3)  # the experts did contribute before


def test_penalty_is_the_l1_norm_of_a_ka_a_am_t_and_gives_both_a_gradients():
    layer = _layer()
    layer.drop_noise_experts()
    layer.add_alignment_module(3, generator(0, "am"))
    assert torch.count_nonzero(layer.am_B) == 0 and torch.count_nonzero(layer.am_A) == layer.am_A.numel()
    layer.train()
    layer(torch.randn(2, 12))  # the penalty is taken inside the forward
    want = sum(abs(float(layer.ka_A[i].detach() @ layer.am_A[j].detach())) for i in range(3) for j in range(3))
    assert float(layer.last_penalty.detach()) == pytest.approx(want, rel=1e-5)
    layer.last_penalty.backward()
    for grad in (layer.ka_A.grad, layer.am_A.grad):
        assert grad is not None and float(grad.abs().sum()) > 0
    # d/dA_KA |A_KA A_AM^T|_1 = sign(A_KA A_AM^T) A_AM (and symmetrically for A_AM)
    sign = torch.sign(layer.ka_A @ layer.am_A.T).detach()
    assert torch.allclose(layer.ka_A.grad, sign @ layer.am_A.detach(), atol=1e-6)
    assert torch.allclose(layer.am_A.grad, sign.T @ layer.ka_A.detach(), atol=1e-6)


def test_stage1_run_folder_and_record(stage1):
    info = json.loads((stage1 / "medcare_config.json").read_text())
    assert info["stage"] == 1 and info["noise_experts"] and info["base"]["fingerprint"]
    tensors = load_file(str(stage1 / "medcare_model.safetensors"))
    gate = "model.layers.0.mlp.gate_proj"
    assert tensors[f"{gate}.ka_A"].shape == (32, 64) and tensors[f"{gate}.noise_A"].shape == (8, 16, 64)
    assert tensors[f"{gate}.router.weight"].shape == (8, 64) and tensors[f"{gate}.router.bias"].shape == (8,)
    assert tensors["model.layers.1.self_attn.q_proj.lora_A"].shape == (16, 64)
    assert not any(k.endswith(".weight") and "router" not in k for k in tensors)  # no base weights stored
    record = json.loads((stage1 / "medmerge_train.json").read_text())
    assert record["stage"] == "medcare-stage1" and len(record["data"]["parts"]) == 2
    assert [p["stage"] for p in record["data"]["parts"]] == ["pt", "sft"]
    assert (stage1 / "loss.png").is_file() and (stage1 / "train_log.jsonl").read_text().strip()
    # training moved the noise experts and the router (they are trained, not only initialised)
    assert float(tensors[f"{gate}.noise_B"].abs().sum()) > 0


def test_stage2_starts_from_stage1_knowledge_aggregator_with_attention_frozen(world, stage1, stage2):
    out, capture = stage2
    s1 = load_file(str(stage1 / "medcare_model.safetensors"))
    ka = {k: v for k, v in capture.begin.items() if k.endswith((".ka_A", ".ka_B"))}
    assert len(ka) == 12
    for name, value in ka.items():
        assert torch.equal(value, s1[name]), name
    # attention: W0 + (32/16) B A of stage 1, merged, frozen, unchanged by training
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(str(world / "base")).named_parameters())
    attention = [k for k in capture.begin if "self_attn" in k]
    assert len(attention) == 8
    for name in attention:
        module = name.removesuffix(".weight")
        want = base[name].detach() + 2.0 * s1[f"{module}.lora_B"] @ s1[f"{module}.lora_A"]
        assert torch.allclose(capture.begin[name], want, atol=1e-6)
        assert torch.equal(capture.begin[name], capture.end[name])
    assert all(n.endswith((".ka_A", ".ka_B", ".am_A", ".am_B")) for n in capture.grad)
    assert len(capture.grad) == 24
    s2 = load_file(str(out / "medcare_model.safetensors"))
    assert not any("noise" in k or "router" in k for k in s2)
    assert any(not torch.equal(s2[k], s1[k]) for k in ka)  # the KA kept training in stage 2


def test_training_reduces_the_penalty(stage2):
    out, _ = stage2
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("orth_penalty" in r and "nll" in r for r in rows)
    assert rows[-1]["orth_penalty"] < 0.5 * rows[0]["orth_penalty"]
    # the logged loss is NLL + lambda * penalty (lambda 0.5)
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll"] + 0.5 * rows[0]["orth_penalty"], rel=0.02)
    info = json.loads((out / "medcare_config.json").read_text())
    assert info["alignment"] == {"rank": 32, "lambda": 0.5, "keep_noise": False} and info["stage1"]["sha256"]


def test_export_reproduces_the_module_model_and_loads_in_transformers(world, stage2, tmp_path):
    from transformers import AutoModelForCausalLM

    from medmerge.medcare.train import load_run

    out, _ = stage2
    record = export(out, tmp_path / "exported", shard_size="40KB", progress=False)
    v = record["verified"]
    assert v["ok"] and v["max_abs_diff"] <= v["tolerance"] and v["argmax_agreement"] == 1.0
    assert v["tolerance_rule"] == "0.0001 x max(1, max |logit|) for float32"
    assert v["adapter_effect"] > 100 * v["max_abs_diff"]  # the check would see a missing term
    assert len(list((tmp_path / "exported").glob("model-*.safetensors"))) > 1  # sharded by the engine's writer
    assert (tmp_path / "exported" / "medmerge.yml").is_file() and (tmp_path / "exported" / "README.md").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    module = load_run(out).model
    ids = torch.tensor([[1, 5, 9, 12, 30, 7, 2]])
    with torch.no_grad():
        a, b = model(ids).logits, module(ids).logits
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))  # the stated float32 tolerance
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 10)
    with pytest.raises(OutputExistsError, match="pass --force"):
        export(out, tmp_path / "exported", progress=False)


def test_stage1_export_needs_drop_noise_and_then_folds_the_knowledge_path(stage1, tmp_path):
    with pytest.raises(InputError, match="routed noise experts.*--drop-noise"):
        export(stage1, tmp_path / "s1", progress=False)
    assert not (tmp_path / "s1").exists()
    record = export(stage1, tmp_path / "s1", drop_noise=True, progress=False)
    assert record["verified"]["ok"] and record["medmerge"]["modules_folded"] == 14


def test_bad_input_names_what_was_found(world, stage1, stage2, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(InputError, match=r"c_attn not found \(c_attn is a Conv1D, not nn.Linear\).*c_fc \(Conv1D\)"):
        check_architecture(gpt2, ModuleSettings(attention={"target_modules": ["c_attn"]}), "gpt2")
    with pytest.raises(InputError, match=r"q_proj, k_proj, v_proj, o_proj not found.*modules with weights"):
        MedCareModel.stage1(gpt2, ModuleSettings(), 0, where="gpt2")
    with pytest.raises(ConfigError, match="modules.ffn.noise_rnak"):
        load_stage_config("stage1", None, raw={"model": "x", "data": [{"path": "y"}],
                                               "modules": {"ffn": {"noise_rnak": 4}}})
    with pytest.raises(ConfigError, match="top_k=3 is more than noise_experts=2"):
        load_stage_config("stage1", None, raw={"model": "x", "data": [{"path": "y"}],
                                               "modules": {"ffn": {"noise_experts": 2, "top_k": 3}}})
    with pytest.raises(InputError, match="is a stage-2 run; give the stage-1 run folder"):
        run_stage2(_stage2_cfg(world, stage2[0]), tmp_path / "x", progress=False)
    other = make_model(tmp_path / "other", arch="llama", seed=5, hidden=64, layers=2, vocab=64, max_positions=256)
    with pytest.raises(InputError, match="is not the one stage 1"):
        run_stage2(_stage2_cfg(world, stage1, model=str(other)), tmp_path / "y", progress=False)
    with pytest.raises(InputError, match="not a MedCare run folder"):
        export(world / "base", tmp_path / "z", progress=False)
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_qwen_style_models_are_supported(qwen_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(qwen_family["base"]))
    mc = MedCareModel.stage1(model, ModuleSettings(), 0)
    assert len(mc.attention_layers()) == 8 and len(mc.ffn_layers()) == 6
    mc.to_stage2(AlignmentSettings(keep_noise=True), 0)
    assert mc.has_noise() and all(m.am_A is not None for m in mc.ffn_layers().values())


@pytest.mark.slow  # several training runs
def test_cli_runs_both_stages_and_export(world, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from medmerge.cli import app

    cfg1 = {"model": str(world / "base"), "chat_template": "chatml", "max_seq_length": 64, "training": TRAIN,
            "data": [{"path": str(world / "sft.jsonl")}],
            "modules": {"ffn": {"knowledge_rank": 8, "noise_experts": 4, "noise_rank": 4}}}
    (tmp_path / "s1.yml").write_text(yaml.safe_dump(cfg1))
    (tmp_path / "s2.yml").write_text(yaml.safe_dump({"stage1": "s1", "data": [{"path": str(world / "sft.jsonl")}],
                                                     "chat_template": "chatml", "max_seq_length": 64,
                                                     "training": TRAIN, "alignment": {"rank": 8}}))
    runner = CliRunner()
    res = runner.invoke(app, ["medcare", "stage1", str(tmp_path / "s1.yml"), "training.max_steps=4",
                              "--out", str(tmp_path / "s1"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["medcare", "stage2", str(tmp_path / "s2.yml"), "alignment.lambda=1.0",
                              "--out", str(tmp_path / "s2"), "-q"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "s2" / "medcare_config.json").read_text())
    assert info["alignment"]["lambda"] == 1.0 and info["modules"]["ffn"]["knowledge_rank"] == 8
    res = runner.invoke(app, ["medcare", "export", str(tmp_path / "s2"), "--out", str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0 and "verified" in res.output, res.output
    res = runner.invoke(app, ["medcare", "export", str(tmp_path / "s1"), "--out", str(tmp_path / "m1"), "-q"])
    assert res.exit_code == 2 and "--drop-noise" in res.output


@pytest.mark.slow  # several training runs
def test_an_interrupted_stage_resumes_from_its_checkpoint(world, tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise KeyboardInterrupt

    cfg = _stage1_cfg(world, training={**TRAIN, "save_steps": 4})
    with pytest.raises(KeyboardInterrupt):
        run_stage1(cfg, tmp_path / "s1", progress=False, callbacks=(Stop(),))
    assert not (tmp_path / "s1").exists() and (tmp_path / "s1.medmerge-work" / "checkpoint-4").is_dir()
    resumed = run_stage1(cfg, tmp_path / "s1", resume=True, progress=False)
    straight = run_stage1(cfg, tmp_path / "s1b", progress=False)
    assert resumed.steps == straight.steps == 8
    a = load_file(str(tmp_path / "s1" / "medcare_model.safetensors"))
    b = load_file(str(tmp_path / "s1b" / "medcare_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)
