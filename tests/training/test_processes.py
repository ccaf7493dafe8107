"""Several processes on CPU (`accelerate launch --multi_gpu --num_processes 2`, DDP over gloo) train and evaluate
like one: the same loss curve and weights for the same global batch, the same documents scored once each.

training.batch_size is the global batch: two processes take half of each batch each (accelerate's
split_batches), the gradient is averaged across processes (transformers counts the loss tokens across
devices), so one config gives the same loss curve on one process or two, to float rounding. Evaluation shards documents
r, r + 2, ... to process r and gathers them on rank 0: per-document answers and metrics equal one process's.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from medmerge.tiny import BASE_WORDS, make_model

pytestmark = pytest.mark.slow  # starts two-process runs

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
LOSS_RTOL = 1e-5  # one process against two: float32 reduction order only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(args: list, processes: int, cwd: Path) -> subprocess.CompletedProcess:
    cli = ["-m", "medmerge.cli", *map(str, args)]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *cli]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("processes")
    make_model(root / "base", arch="llama", seed=0, hidden=32, layers=2, vocab=64, max_positions=256)
    rng = random.Random(0)
    with open(root / "sft.jsonl", "w") as f:  # uneven lengths: each process pads its half of a batch alone
        for _ in range(48):
            f.write(json.dumps({"prompt": " ".join(rng.choice(BASE_WORDS) for _ in range(rng.randint(2, 9))),
                                "response": " ".join(rng.choice(BASE_WORDS) for _ in range(rng.randint(2, 9)))})
                    + "\n")
    return root


def _train_config(world: Path, name: str, batch_size: int, **extra) -> Path:
    cfg = {"stage": "sft", "model": "base", "data": {"path": "sft.jsonl"}, "max_seq_length": 64,
           "training": {"max_steps": 12, "batch_size": batch_size, "lr": 1e-3, "logging_steps": 1, "threads": 1,
                        "warmup_ratio": 0.0, "device": "cpu"}, **extra}
    path = world / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_train_like_one_with_the_same_global_batch(world, tmp_path, lora):
    extra = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}} if lora else {}
    cfg = _train_config(world, "lora" if lora else "full", 4, **extra)
    _run(["train", cfg, "--out", tmp_path / "one", "--quiet"], 1, world)
    two = _run(["train", cfg, "--out", tmp_path / "two", "--quiet"], 2, world)
    assert (two.stdout + two.stderr).count("trained 12 steps") == 1  # rank 0 alone reports (and writes)

    rec1, rec2 = (json.loads((tmp_path / n / "medmerge_train.json").read_text()) for n in ("one", "two"))
    assert rec1["processes"] == {"count": 1, "per_process_batch": 4, "global_batch": 4,
                                 "examples_repeated_per_epoch": 0}
    assert rec2["processes"] == {"count": 2, "per_process_batch": 2, "global_batch": 4,
                                 "examples_repeated_per_epoch": 0}
    # every example's tokens counted once per epoch, over both processes (12 steps x 4 = the 48 examples)
    assert rec1["result"]["tokens_seen"] == rec2["result"]["tokens_seen"] > 0
    curve1, curve2 = ([json.loads(x)["loss"] for x in (tmp_path / n / "train_log.jsonl").open()] for n in ("one", "two"))
    assert len(curve1) == len(curve2) == 12  # one row per step: rank 1 does not log too
    worst = max(abs(a - b) / abs(a) for a, b in zip(curve1, curve2))
    print(f"{'lora' if lora else 'full'}: loss curves' largest relative difference {worst:.2e}; "
          f"final {curve1[-1]:.6f} vs {curve2[-1]:.6f}")
    assert worst < LOSS_RTOL
    assert curve1[0] != curve1[-1]  # it trained
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    w1, w2 = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
    assert w1.keys() == w2.keys()
    for k in w1:
        scale = max(float(w1[k].abs().max()), 1e-6)
        assert float((w1[k] - w2[k]).abs().max()) / scale < 1e-4, k


def test_a_batch_that_does_not_split_is_refused_and_a_short_last_batch_is_said(world, tmp_path):
    cfg = _train_config(world, "odd", 3)
    r = subprocess.run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                        "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "medmerge.cli",
                        "train", str(cfg), "--out", str(tmp_path / "odd")], cwd=world, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "training.batch_size 3 is the global batch" in r.stderr and "multiple of 2" in r.stderr
    assert not (tmp_path / "odd").exists()
    # 48 examples in batches of 10: the last holds 8, completed with 2 repeated examples (said and recorded)
    cfg = _train_config(world, "ten", 10, training={"max_steps": -1, "epochs": 1, "batch_size": 10, "lr": 1e-3,
                                                   "threads": 1, "device": "cpu", "warmup_ratio": 0.0})
    r = _run(["train", cfg, "--out", tmp_path / "ten", "--quiet"], 2, world)
    assert "completes it with 2 examples from the epoch's start" in " ".join(r.stderr.split())
    rec = json.loads((tmp_path / "ten" / "medmerge_train.json").read_text())
    assert rec["processes"]["examples_repeated_per_epoch"] == 2 and rec["result"]["steps"] == 5


def _task(world: Path, name: str, rows: list[dict]) -> Path:
    with open(world / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": f"tiny_{name}", "data": f"{name}.jsonl", "input": "source",
                                    "target": "target", "prompt": "{input}", "metrics": ["rouge", "bleu"],
                                    "max_new_tokens": 6}))
    return path


def test_two_processes_evaluate_each_document_once_with_one_process_metrics(world, tmp_path):
    rng = random.Random(1)
    rows = [{"source": " ".join(rng.choice(BASE_WORDS) for _ in range(5)), "target": "x"} for _ in range(11)]
    task = _task(world, "gen", rows)  # 11 documents: the processes get 6 and 5 (lm-eval pads the shorter one)
    _run(["eval", "base", "--task-file", task, "--out", tmp_path / "teacher", "--device", "cpu", "--log-samples",
          "--chat-template", "none"], 1, world)
    answers = {json.loads(x)["doc_id"]: json.loads(x)["response"] for x in
               (tmp_path / "teacher" / "samples" / "tiny_gen.jsonl").open()}
    for i, row in enumerate(rows):  # half the targets are the model's own answers: scores well away from 0 and 1
        row["target"] = answers[i].strip() if i % 2 == 0 and answers[i].strip() else "patient denies fever"
    task = _task(world, "gen", rows)

    args = ["eval", "base", "--task-file", task, "--device", "cpu", "--log-samples", "--chat-template", "none"]
    _run([*args, "--out", tmp_path / "one"], 1, world)
    two = _run([*args, "--out", tmp_path / "two"], 2, world)
    assert two.stdout.count("composite") == 1  # rank 0 alone prints the table
    r1, r2 = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert r1["config"]["processes"] == 1 and r2["config"]["processes"] == 2
    assert r1["samples"] == r2["samples"] == {"tiny_gen": {"original": 11, "effective": 11}}
    s1, s2 = ({json.loads(x)["doc_id"]: json.loads(x) for x in (tmp_path / n / "samples" / "tiny_gen.jsonl").open()}
              for n in ("one", "two"))
    assert sorted(s2) == list(range(11))  # each document once, none lost to the padding
    assert all(s1[i]["response"] == s2[i]["response"] for i in s1)
    assert r1["tasks"] == r2["tasks"] and r1["stderr"] == r2["stderr"]
    assert 0 < r1["tasks"]["tiny_gen"]["rouge1"] < 100
    print(f"one process {r1['tasks']['tiny_gen']}; two processes {r2['tasks']['tiny_gen']}")


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared data folder {SHARED}")
def test_two_processes_score_multiple_choice_and_ifeval_like_one(world, tmp_path):
    """Log-likelihood requests (MedQA, 4 options per question) and IFEval's generations and checkers."""
    args = ["eval", "base", "--tasks", "mm_medqa,mm_ifeval", "--limit", "7", "--data-dir", SHARED, "--device", "cpu",
            "--log-samples", "--chat-template", "none", "--gen-kwargs", "max_new_tokens=8"]
    _run([*args, "--out", tmp_path / "one"], 1, world)
    _run([*args, "--out", tmp_path / "two"], 2, world)
    r1, r2 = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert r1["samples"] == r2["samples"] and r1["samples"]["mm_medqa"]["effective"] == 7
    assert r1["tasks"] == r2["tasks"]
    for task, errs in r1["stderr"].items():  # the gathered documents come in another order: the last bit may differ
        assert r2["stderr"][task] == pytest.approx(errs, rel=1e-12)
    for task in ("mm_medqa", "mm_ifeval"):
        s1, s2 = ({json.loads(x)["doc_id"]: json.loads(x) for x in (tmp_path / n / "samples" / f"{task}.jsonl").open()}
                  for n in ("one", "two"))
        assert sorted(s1) == sorted(s2) == list(range(7))
        assert all(s1[i]["response"] == s2[i]["response"] for i in s1), task
    print(f"MedQA/IFEval, one process {r1['tasks']}; two processes {r2['tasks']}")


def test_medcare_stages_and_the_orthogonality_penalty_train_like_one_process(world, tmp_path):
    """The penalty is computed whole on every process (it reads weights, not data) and added after transformers
    scales each process's token loss: DDP's average of the gradients is then exactly one process's."""
    train = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "logging_steps": 1, "threads": 1, "warmup_ratio": 0.0,
             "device": "cpu"}
    (world / "s1.yml").write_text(yaml.safe_dump({
        "model": "base", "chat_template": "chatml", "max_seq_length": 64, "training": train,
        "data": [{"path": "sft.jsonl"}],
        "modules": {"attention": {"dropout": 0.0},  # dropout draws differ per process
                    "ffn": {"knowledge_rank": 8, "noise_experts": 4, "noise_rank": 4, "dropout": 0.0}}}))
    curves = {}
    for n in (1, 2):
        _run(["medcare", "stage1", world / "s1.yml", "--out", tmp_path / f"s1_{n}", "-q"], n, world)
        (world / f"s2_{n}.yml").write_text(yaml.safe_dump({
            "stage1": str(tmp_path / f"s1_{n}"), "data": [{"path": "sft.jsonl"}], "chat_template": "chatml",
            "max_seq_length": 64, "training": train, "alignment": {"rank": 8, "lambda": 1.0}}))
        _run(["medcare", "stage2", world / f"s2_{n}.yml", "--out", tmp_path / f"s2_{n}", "-q"], n, world)
        curves[n] = {s: [json.loads(x) for x in (tmp_path / f"{s}_{n}" / "train_log.jsonl").open()]
                     for s in ("s1", "s2")}
    for stage in ("s1", "s2"):
        for key in ("loss", "nll", "orth_penalty") if stage == "s2" else ("loss",):
            one, two = ([row[key] for row in curves[n][stage]] for n in (1, 2))
            assert len(one) == len(two) == 6
            worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
            print(f"medcare {stage} {key}: largest relative difference {worst:.2e}")
            assert worst < 1e-5, (stage, key, one, two)
    assert curves[1]["s2"][-1]["orth_penalty"] < curves[1]["s2"][0]["orth_penalty"]  # the penalty did work


def test_accelerate_cpu_flag_starting_one_process_is_said(world, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (several need mpirun): medmerge says so."""
    r = subprocess.run([*ACCELERATE, "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "-m", "medmerge.cli", "train", str(_train_config(world, "cpu", 4)),
                        "--out", str(tmp_path / "cpu"), "--quiet"], cwd=world, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running as one process: `accelerate launch --cpu`" in " ".join(r.stderr.split())
    assert json.loads((tmp_path / "cpu" / "medmerge_train.json").read_text())["processes"]["count"] == 1
