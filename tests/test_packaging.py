"""The package installs like one: every runtime import declared, the lock inside the ranges, the wheel works alone.

The wheel test builds medmerge's wheel, installs it into a fresh venv with `pip install <wheel>` (CPU torch
pinned first, as the README says; no editable install, no lock file: pip resolves the declared ranges, so it
usually picks newer releases than the lock) and runs `medmerge merge`, `medmerge eval` (IFEval: punkt_tab is
written on first use) and `medmerge adapters merge` with that venv's own `medmerge` command.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "medmerge"
# third-party modules imported only on optional paths, and the extra that declares each
OPTIONAL = {"gguf": "real", "vllm": "vllm", "psycopg": "postgres", "psycopg2": "postgres"}
# modules whose distribution is not installed in the dev environment (so packages_distributions cannot say)
NOT_INSTALLED = {"vllm": "vllm", "psycopg2": "psycopg2-binary"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    project = _project()
    deps = {_norm(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {k: {_norm(r.name): r for r in map(Requirement, v)} for k, v in project["optional-dependencies"].items()}
    return deps, extras


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the source files that import it."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "medmerge" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_declared_directly():
    deps, extras = _declared()
    dists = packages_distributions()
    problems = []
    imports = _imports()
    assert {"torch", "transformers", "peft", "lm_eval", "optuna", "sqlalchemy"} <= set(imports)  # the scan works
    for module, files in sorted(imports.items()):
        names = NOT_INSTALLED.get(module) or dists.get(module)
        if not names:
            problems.append(f"{module} (imported by {sorted(files)[0]}) is not installed: which package gives it?")
            continue
        names = [_norm(n) for n in ([names] if isinstance(names, str) else names)]
        if module in OPTIONAL:
            extra = extras.get(OPTIONAL[module], {})
            if not any(n in extra for n in names):
                problems.append(f"{module}: declare {names[0]} in the [{OPTIONAL[module]}] extra")
        elif not any(n in deps for n in names):
            problems.append(f"{module} (imported by {sorted(files)[0]}) comes from {names}, which pyproject.toml's "
                            "dependencies do not declare")
    assert not problems, "\n".join(problems)


def test_peft_and_accelerate_are_declared():
    deps, _ = _declared()
    assert {"peft", "accelerate"} <= set(deps)  # issue 18: they used to arrive only through lm-eval's hf extra


def test_the_lock_file_lies_inside_the_declared_ranges():
    deps, extras = _declared()
    declared = {**{k: r for e in extras.values() for k, r in e.items()}, **deps}
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            pins[_norm(req.name)] = next(iter(req.specifier)).version
    outside = [f"{name}=={version} (declared {declared[name].specifier})" for name, version in pins.items()
               if name in declared and not declared[name].specifier.contains(version, prereleases=True)]
    assert not outside, f"requirements/lock.txt pins versions pyproject.toml excludes: {outside}"
    unpinned = sorted(set(deps) - set(pins) - {"numpy", "pydantic", "pyyaml", "typer", "rich", "tqdm", "torch"})
    assert not unpinned, f"declared but not pinned in requirements/lock.txt: {unpinned}"


IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write two sentences about fever. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Answer in all lowercase letters: what is asthma?",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
]


@pytest.mark.slow  # builds a venv and installs medmerge's dependencies into it (about a minute)
def test_the_wheel_installs_into_a_fresh_venv_and_its_commands_work(llama_family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    python = shutil.which("python3.11") or sys.executable
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "_work"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("medmerge-*.whl"))
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["torch==2.13.0"], [str(wheel)]):  # CPU torch first and pinned (unpinned pulls the CUDA build)
        r = subprocess.run(pip + args, capture_output=True, text=True)
        assert r.returncode == 0, f"pip install {args}: {r.stderr[-3000:]}"
    show = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import medmerge, sys; print(medmerge.__file__)"], capture_output=True, text=True)
    assert str(venv) in show.stdout and str(ROOT) not in show.stdout  # the installed copy, not this checkout

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "NLTK", "MEDMERGE"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MEDMERGE_NLTK_DATA=str(tmp_path / "nltk"),
               HOME=str(tmp_path / "home"), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")

    def medmerge(*args) -> subprocess.CompletedProcess:
        r = subprocess.run([str(venv / "bin" / "medmerge"), *map(str, args)], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, f"medmerge {' '.join(map(str, args))}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r

    # merge: the installed medmerge's output equals this checkout's, tensor for tensor
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {llama_family['base']}\nmodels:\n"
                   f"  - model: {llama_family['a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                   f"  - model: {llama_family['b']}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
                   "dtype: float32\n")
    medmerge("merge", cfg, tmp_path / "merged", "--quiet")
    from medmerge.merging.api import merge as merge_here  # noqa: PLC0415

    merge_here(cfg, tmp_path / "merged_here", progress=False)
    from safetensors.torch import load_file

    ours = {k: v for f in sorted((tmp_path / "merged_here").glob("*.safetensors")) for k, v in load_file(f).items()}
    theirs = {k: v for f in sorted((tmp_path / "merged").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)

    # eval: IFEval on a two-prompt copy; punkt_tab is written on first use into MEDMERGE_NLTK_DATA
    data = tmp_path / "data" / "ifeval"
    data.mkdir(parents=True)
    (data / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS))
    assert not (tmp_path / "nltk").exists()
    medmerge("eval", tmp_path / "merged", "--tasks", "mm_ifeval", "--data-dir", tmp_path / "data", "--out",
             tmp_path / "eval", "--device", "cpu", "--gen-kwargs", "max_new_tokens=8")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["samples"]["mm_ifeval"]["effective"] == 2 and "mm_ifeval" in results["tasks"]
    assert (tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english" / "sent_starters.txt").is_file()

    # adapters merge: a LoRA on the base, merged exactly into full weights
    model = AutoModelForCausalLM.from_pretrained(str(llama_family["base"]))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)) \
        .save_pretrained(str(tmp_path / "lora"))
    medmerge("adapters", "merge", "--base", llama_family["base"], "--adapter", f"{tmp_path / 'lora'}:0.5",
             "--out", tmp_path / "adapted")
    assert (tmp_path / "adapted" / "config.json").is_file()
