"""The package's layers import only downwards, without cycles, and import at the top of their files.

Read from the code (every `import` statement, at any depth), not from what happens to be loaded:

    errors -> settings, runtime, tiny -> io -> merging -> training, evaluation, adapters, medcare
           -> miniclinic -> experiments -> cli and the public API (medmerge/__init__.py)

A module may import its own unit (`medmerge.merging.plan` -> `medmerge.merging.methods`) and any
lower layer; between the units of one layer only the edges in SIDEWAYS are allowed, each with its
reason (docs/architecture.md). Imports of medmerge inside functions are not allowed (they hide the
dependency graph); a third-party import inside a function must be one of the heavy dependencies in
DEFERRED, which only the steps that use them should pay for.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    {"medmerge.errors"},
    {"medmerge.settings", "medmerge.runtime", "medmerge.tiny"},
    {"medmerge.io"},
    {"medmerge.merging"},
    {"medmerge.training", "medmerge.evaluation", "medmerge.adapters", "medmerge.medcare"},
    {"medmerge.miniclinic"},
    {"medmerge.experiments"},
    {"medmerge.cli", "medmerge"},
]
SIDEWAYS = {
    ("medmerge.medcare", "medmerge.training"): "MedCare's two stages run on medmerge's trainer (its hooks)",
}
DEFERRED = {  # heavy third-party packages, imported by the functions that need them
    "transformers", "peft", "lm_eval", "datasets", "optuna", "matplotlib", "nltk", "sacrebleu", "rouge_score",
    "langdetect", "tokenizers", "punkt", "sqlalchemy", "gguf", "accelerate", "vllm",
}


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    in_functions: list[str] = field(default_factory=list)  # "module: import" of medmerge inside a function
    deferred: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # third-party, in functions


def read_graph(src: Path) -> Graph:
    modules = {}
    for path in sorted((src / "medmerge").rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = Graph(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            for target, text in _targets(node, name, path.name == "__init__.py"):
                if target.split(".")[0] != "medmerge":
                    if id(node) in inner:
                        graph.deferred[target.split(".")[0]].add(name)
                    continue
                if id(node) in inner:
                    graph.in_functions.append(f"{name}: {text}")
                hit = _module_of(target, modules)
                # `from . import __version__` reads a constant of the package, not its code
                if hit and hit != name and not name.startswith(hit + ".") and not text.endswith(" __version__"):
                    graph.edges[name].add(hit)
    return graph


def _targets(node, module: str, is_package: bool):
    if isinstance(node, ast.Import):
        return [(a.name, f"import {a.name}") for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = module.split(".")
            base = ".".join(parts[: len(parts) - node.level + (1 if is_package else 0)] + [node.module or ""]).strip(".")
        else:
            base = node.module
        text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
        return [(f"{base}.{a.name}", text) for a in node.names]
    return []


def _module_of(target: str, modules: dict[str, Path]):
    """The most specific module a dotted import target names (`medmerge.io.fingerprint.sha256_file` -> the module)."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer(module: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS (and to docs/architecture.md)")


def upward_imports(graph: Graph) -> list[str]:
    bad = []
    for a, targets in graph.edges.items():
        for b in targets:
            ua, ub = unit(a), unit(b)
            if ua == ub or layer(b) < layer(a) or (ua, ub) in SIDEWAYS:
                continue
            bad.append(f"{a} -> {b} (layer {layer(a)} imports layer {layer(b)})")
    return sorted(bad)


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph.modules:
        if v not in index:
            visit(v)
    return out


def unit_levels(graph: Graph) -> int:
    """The longest chain of imports between top-level units (the layering's depth)."""
    edges = defaultdict(set)
    for a, targets in graph.edges.items():
        for b in targets:
            if unit(a) != unit(b):
                edges[unit(a)].add(unit(b))
    memo: dict[str, int] = {}

    def depth(u):
        if u not in memo:
            memo[u] = 1 + max((depth(w) for w in edges[u]), default=0)
        return memo[u]

    return max(depth(unit(m)) for m in graph.modules)


GRAPH = read_graph(SRC)


def test_every_module_has_a_layer():
    for module in GRAPH.modules:
        layer(module)


def test_no_layer_imports_a_higher_one():
    assert upward_imports(GRAPH) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_medmerge_is_imported_at_the_top_of_files():
    assert GRAPH.in_functions == []


def test_only_heavy_dependencies_are_imported_inside_functions():
    assert {pkg: sorted(mods) for pkg, mods in GRAPH.deferred.items() if pkg not in DEFERRED} == {}


def test_layering_depth():
    assert unit_levels(GRAPH) <= len(LAYERS)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """An upward import, a cycle and an import inside a function, planted in a copy of a tiny package."""
    pkg = tmp_path / "medmerge"
    (pkg / "io").mkdir(parents=True)
    (pkg / "merging").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "checkpoint.py").write_text("from ..merging import plan\n")  # upward
    (pkg / "merging" / "__init__.py").write_text("")
    (pkg / "merging" / "plan.py").write_text("from . import compute\n\ndef f():\n    from .. import errors\n")
    (pkg / "merging" / "compute.py").write_text("from . import plan\n\ndef g():\n    import scipy\n")  # cycle
    graph = read_graph(tmp_path)
    assert upward_imports(graph) == ["medmerge.io.checkpoint -> medmerge.merging.plan (layer 2 imports layer 3)"]
    assert [sorted(c) for c in cycles(graph)] == [["medmerge.merging.compute", "medmerge.merging.plan"]]
    assert graph.in_functions == ["medmerge.merging.plan: from .. import errors"]
    assert dict(graph.deferred) == {"scipy": {"medmerge.merging.compute"}}
