"""What every experiment config shares: an optional `world:` section, ${VAR} expansion, the `eval:` section.

`world: {preset: quick|full, seed: S}` builds the synthetic clinical world (cached)
into OUT/world, `world: {dir: PATH}` reuses a built one; either way `${world}` and
`${world_tasks}` expand in the rest of the config, as do environment variables.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field, ValidationError

from ..errors import ConfigError
from ..miniclinic.build import build
from ..miniclinic.world import TASKS_DIR
from ..settings import Strict, apply_overrides, read_yaml, validation_message
from ..training.config import Finite, Seed
from .rundir import reuse


class WorldSettings(Strict):
    preset: str = "quick"
    seed: Seed = 0
    dir: Optional[Path] = None  # an already built world (`medmerge miniclinic build`) instead of OUT/world


class VllmSettings(Finite):
    """`eval.vllm`: lm-eval's vLLM backend options (evaluation.engines.VllmOptions), for `eval.engine: vllm`."""

    tensor_parallel: int = Field(1, ge=1)
    data_parallel: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: Optional[int] = Field(None, ge=1)


class EvalSettings(Finite):
    """Which tasks every model of an experiment is evaluated on, and how (`medmerge eval`'s options)."""

    tasks: list[str] = []
    include_paths: list[Path] = []
    task_files: list[Path] = []
    data_dir: Optional[Path] = None
    limit: Optional[float] = Field(None, gt=0)  # finite (Finite); < 1: a share of each task, else a count
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    max_new_tokens: Optional[int] = Field(None, ge=1)
    chat_template: str = "auto"
    engine: Literal["hf", "vllm"] = "hf"  # lm-eval's backend; vllm: a CUDA GPU, pip install 'medmerge[vllm]'
    vllm: VllmSettings = VllmSettings()

    def kwargs(self, seed: int) -> dict:
        """Keyword arguments of `evaluation.evaluate` (without the model, tasks and output)."""
        return dict(include_paths=self.include_paths, task_files=self.task_files, data_dir=self.data_dir,
                    limit=self.limit, batch_size=self.batch_size, device=self.device,
                    chat_template=self.chat_template, seed=seed,
                    gen_kwargs={"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else None,
                    engine=self.engine, vllm=self.vllm.model_dump() if self.engine == "vllm" else None)


def resolve_eval_paths(ev: Optional[dict], rel) -> dict:
    """An `eval:` section with its include paths, task files and data folder made absolute."""
    ev = dict(ev or {})
    for key in ("include_paths", "task_files"):
        ev[key] = [rel(p) for p in ev.get(key) or []]
    if ev.get("data_dir"):
        ev["data_dir"] = rel(ev["data_dir"])
    return ev


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand(value, variables: dict[str, str]):
    """${name} / $name in every string of a nested config: `variables` first, then the environment."""
    if isinstance(value, str):
        def sub(m):
            key = m.group(1) or m.group(2)
            if key in variables:
                return variables[key]
            if key in os.environ:
                return os.environ[key]
            hint = "add a world: section" if key in ("world", "world_tasks") else "or override the key that uses it (KEY=VALUE)"
            raise ConfigError(f"${{{key}}} is not set: export {key}=..., {hint}")
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, variables) for k, v in value.items()}
    return value


def prepare_world(section: Optional[dict], config_path: Path, out: Path, progress: bool = True) -> tuple[dict, Optional[dict]]:
    """Build or locate the world a config's `world:` section asks for -> (variables, world info)."""
    if not section:
        return {}, None
    try:
        ws = WorldSettings(**section)
    except ValidationError as e:
        raise ConfigError(f"{config_path}: world: {validation_message(e)}") from None
    if ws.dir is not None:
        world_dir = ws.dir if ws.dir.is_absolute() else (config_path.parent / ws.dir).resolve()
        if not (world_dir / "summary.json").is_file():
            raise ConfigError(f"world.dir {world_dir} is not a built world (no summary.json); build it with "
                              "`medmerge miniclinic build`, or drop world.dir to build one into OUT/world")
    else:
        world_dir = out / "world"
        reuse(world_dir, "summary.json", lambda: build(world_dir, preset=ws.preset, seed=ws.seed, force=True,
                                                       progress=progress))
    summary = json.loads((world_dir / "summary.json").read_text())
    info = {"dir": str(world_dir), "preset": summary.get("preset"), "seed": summary.get("seed"),
            "code_version": summary.get("code_version")}
    return {"world": str(world_dir), "world_tasks": str(TASKS_DIR)}, info


def relative_to(root: Path):
    """A function resolving a config's relative paths against the config file's folder."""
    def rel(p):
        return p if p is None or Path(p).is_absolute() else str((root / p).resolve())
    return rel


def read_experiment(path: Path, out: Path, overrides, what: str, progress: bool = True):
    """Read an experiment YAML (+ KEY=VALUE overrides), build or find its world, expand variables.

    Returns (raw dict, a resolver of relative paths against the file's folder, world info or None).
    """
    raw = apply_overrides(read_yaml(path, what), list(overrides))
    variables, world = prepare_world(raw.get("world"), path, out, progress=progress)
    return expand(raw, variables), relative_to(path.parent), world


def experiment_inputs(path: str | Path, overrides: Sequence[str], what: str) -> list[Path]:
    """`config_inputs` of a recipe's config, which is read first: a config file that is missing, not YAML or not
    a mapping, or an override that does not apply, is a ConfigError before the run folder is looked at."""
    apply_overrides(read_yaml(Path(path), what), list(overrides))
    return config_inputs(path, overrides)


def config_inputs(path: str | Path, overrides: Sequence[str] = ()) -> list[Path]:
    """The config file and every existing file or folder its values name (absolute, or relative to its folder).

    What a run folder must never delete or lie inside (checked by `open_run_dir` before --force removes
    anything). Values with unexpanded ${variables} (the world built into OUT) are not inputs.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path, "config"), list(overrides)) if path.is_file() else {}
    found: list[Path] = [path] if path.is_file() else []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value and "$" not in value and "\n" not in value and len(value) < 4096:
            candidate = Path(value).expanduser()
            candidate = candidate if candidate.is_absolute() else path.parent / candidate
            try:
                if candidate.exists() and candidate.resolve() != path.parent.resolve():
                    found.append(candidate)
            except OSError:
                pass

    walk(raw)
    return found
