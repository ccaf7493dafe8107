"""Which evaluation tasks exist and what they need: medmerge's `mm_*` tasks, include paths, task files, built-ins.

`plan_tasks` resolves every requested name before a model is loaded (and checks each
shipped task's data file, naming it when it is missing); lm-eval's TaskManager is built
over medmerge's task folder plus the include paths, and indexes lm-eval's own built-in
tasks only when one is asked for (that takes about 15 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..errors import InputError, MedmergeError
from . import data
from .taskfile import TaskFile, load_task_file, yaml_problem

TASKS_DIR = Path(__file__).parent / "tasks"


def _read_task_yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except UnicodeDecodeError:
        raise InputError(f"task YAML {path}: not UTF-8 text; an include path must hold lm-eval task YAML files") from None
    except yaml.YAMLError as e:
        raise InputError(f"task YAML {path}{yaml_problem(e)}; fix it or remove it from the include path") from None


def _include_folder(folder: str | Path) -> Path:
    """An --include-path: an existing folder holding at least one .yaml file."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise InputError(f"--include-path {path} does not exist; pass a folder of lm-eval task YAML files")
    if not path.is_dir():
        raise InputError(f"--include-path {path} is a file; pass the folder that holds the lm-eval task YAML files")
    if next(path.rglob("*.yaml"), None) is None:
        raise InputError(f"--include-path {path} holds no .yaml task files; pass the folder of lm-eval task YAMLs")
    return path


def shipped_tasks(include_paths: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Task and group names -> their YAML file: medmerge's mm_* tasks, then those of each include path.

    An include path is a folder of lm-eval task YAMLs (with their `!function` hooks);
    this is how other task suites, e.g. the synthetic clinical world's, plug in.
    """
    found = {}
    for path in sorted(TASKS_DIR.glob("mm_*.yaml")):
        spec = _read_task_yaml(path)
        found[spec.get("group") or spec["task"]] = path
    for folder in include_paths:
        folder = _include_folder(folder)
        for path in sorted(folder.rglob("*.yaml")):
            spec = _read_task_yaml(path)
            name = spec.get("group") or spec.get("task") if isinstance(spec, dict) else None
            if isinstance(name, str):
                found[name] = path
    return found


def group_members(name: str, include_paths: Sequence[str | Path] = ()) -> list[str]:
    """A group's task names (entries may be names or inline task configs), or [name] for a task."""
    path = shipped_tasks(include_paths)[name]
    spec = _read_task_yaml(path)
    if "group" not in spec:
        return [name]
    entries = spec.get("task")
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise InputError(f"task YAML {path}: group {name!r} must list its tasks under 'task', not {entries!r}")
    members = [e if isinstance(e, str) else e.get("task") if isinstance(e, dict) else None for e in entries]
    bad = [e for e, m in zip(entries, members) if not isinstance(m, str)]
    if bad:
        raise InputError(f"task YAML {path}: group {name!r} lists {bad[0]!r}, which names no task; list task names "
                         "(or task configs with a 'task' key)")
    return members


def task_table(include_paths: Sequence[str | Path] = ()) -> list[tuple[str, str, str, str]]:
    """(task, kind, the data files it expects, its YAML file) for every shipped and included task."""
    expects: dict[str, list[str]] = {}
    for src in data.SOURCES.values():
        expects.setdefault(src.task, []).append(" or ".join(src.candidates))
    rows = []
    for name, path in shipped_tasks(include_paths).items():
        members = group_members(name, include_paths)
        kind = f"group of {len(members)}" if members != [name] else ""
        want = expects.get(name) or (["mmlu/test/<subject>_test.csv"] if name.startswith("mm_mmlu_") else [])
        rows.append((name, kind, "; ".join(want), path.name))
    return rows


def builtin_tasks() -> list[str]:
    """lm-eval's own task names (indexing them takes about 15 s; they read the hub)."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import

    return list(TaskManager().all_tasks)


@dataclass
class TaskPlan:
    names: list[str] = field(default_factory=list)  # requested names, in order
    specs: list[Any] = field(default_factory=list)  # what lm-eval loads: names and inline configs
    needs_builtins: bool = False
    task_files: dict[str, TaskFile] = field(default_factory=dict)
    include_paths: list[str] = field(default_factory=list)
    data_dir: Optional[Path] = None
    _manager: Any = None

    def task_manager(self):
        """lm-eval's TaskManager over medmerge's tasks (+ include paths; + built-ins only when asked: indexing them takes ~15 s)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import

            self._manager = TaskManager(
                include_path=[str(TASKS_DIR), *self.include_paths], include_defaults=self.needs_builtins,
                metadata={"data_dir": str(self.data_dir) if self.data_dir else None},
            )
        return self._manager


def plan_tasks(tasks: Sequence[str], task_files: Sequence[str | Path], data_dir: Optional[Path],
               include_paths: Sequence[str | Path] = ()) -> TaskPlan:
    """Resolve task names before a model is loaded: shipped, include paths, task files, or lm-eval built-ins."""
    shipped = shipped_tasks(include_paths)
    plan = TaskPlan(include_paths=[str(p) for p in include_paths], data_dir=data_dir)
    for tf in task_files:
        task = load_task_file(tf)
        if task.name in shipped:
            raise MedmergeError(f"task file {tf}: name {task.name!r} is a shipped task; choose another name")
        if task.name in plan.task_files:  # the second would silently replace the first
            raise InputError(f"task files {plan.task_files[task.name].source} and {task.source} both name their task "
                             f"{task.name!r}; give each task file its own name")
        plan.task_files[task.name] = task
    requested = list(dict.fromkeys([t.strip() for t in tasks if t.strip()] + list(plan.task_files)))
    if not requested:
        raise MedmergeError("no tasks: pass --tasks (e.g. mm_ifeval,mm_pubmedqa) or --task-file SPEC.yaml")
    builtin = []
    for name in requested:
        if name in plan.task_files:
            plan.specs.append(plan.task_files[name].lm_eval_config())
        elif name in shipped:
            plan.specs.append(name)
            for member in group_members(name, include_paths):
                loader = data.LOADERS.get(member)
                if loader is not None:
                    loader(data_dir)  # fail now, naming the file, rather than inside lm-eval
                elif member.startswith("mm_mmlu_"):
                    data.load_mmlu(member[len("mm_mmlu_"):], data_dir)
        else:
            builtin.append(name)
            plan.specs.append(name)
        plan.names.append(name)
    if builtin:
        plan.needs_builtins = True
        known = set(plan.task_manager().all_tasks)
        unknown = [b for b in builtin if b not in known]
        if unknown:
            raise MedmergeError(
                f"unknown task(s) {', '.join(unknown)}; shipped tasks: {', '.join(sorted(shipped))}; "
                "or any lm-eval built-in task (`medmerge tasks --all`), or --task-file SPEC.yaml"
            )
    return plan
