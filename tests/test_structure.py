"""The tree's structure (docs/design.md, "Layers"): no import cycle, no import that runs back up a
layer, no task-name comparison outside fusion_prune/tasks/, and a thin CLI.

Imports are read from the source (top-level and inside functions alike), so a deferred import
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion_prune", "signals", "distill")

#: Every module's layer, lowest first. A module may import its own layer or lower ones, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    # 0: foundations (no model, no data)
    ("fusion_prune.errors", "fusion_prune.cache", "fusion_prune.params", "fusion_prune.utils", "fusion_prune.config",
     "fusion_prune.logs", "fusion_prune.memory"),
    # 1: models, data and the shared training loop
    ("fusion_prune.assets", "fusion_prune.models", "fusion_prune.surgery", "fusion_prune.data",
     "fusion_prune.corpus", "fusion_prune.training", "fusion_prune.logits"),
    # 2: engines: signals, distillation, fine-tuning, drop-one, LM evaluation and healing, fusion, reports
    ("signals", "distill", "fusion_prune.finetune", "fusion_prune.dropone", "fusion_prune.lm", "fusion_prune.heal",
     "fusion_prune.fusion", "fusion_prune.report", "fusion_prune.checkpoint", "fusion_prune.speed",
     "fusion_prune.streaming", "fusion_prune.card", "fusion_prune.export",
     "fusion_prune.harness", "fusion_prune.replace", "fusion_prune.search"),
    # 3: what chooses and what differs between tasks
    ("fusion_prune.strategies", "fusion_prune.tasks"),
    # 4: the loop and what runs it
    ("fusion_prune.loop", "fusion_prune.collect", "fusion_prune.analyze"),
    # 5: the entry points
    ("fusion_prune.api", "fusion_prune.cli", "fusion_prune"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {r for a in node.names if (r := _resolve(a.name))}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                r = full if full in MODULES else _resolve(node.module)
                if r:
                    out.add(r)
    out.discard(module)
    return out


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "fusion_prune") or module == "fusion_prune" and "fusion_prune" in names:
            return i
    raise AssertionError(f"{module} has no layer in tests/test_structure.py: give it one")


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_runs_back_up_a_layer():
    up = sorted(f"{m} ({_layer(m)}) imports {d} ({_layer(d)})" for m, deps in GRAPH.items() for d in deps
                if _layer(d) > _layer(m))
    assert up == []


def test_no_import_cycle():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    # A package's __init__ may import its own submodules (a registry that loads its plug-ins) as long
    # as they do not import the package back: such a pair would show up here.
    assert cycles == []


def _task_names() -> set[str]:
    from fusion_prune.tasks import TASKS

    return set(TASKS)


def test_no_code_outside_tasks_compares_a_task_name():
    names = _task_names()
    found = []
    for m, path in MODULES.items():
        if m.startswith("fusion_prune.tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value in names and m != "fusion_prune.tasks":
                # A task's name as a literal anywhere else (a default, a dict key) is a branch in waiting.
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} ({node.value!r})")
    assert found == []


@pytest.mark.parametrize("path", sorted((ROOT / "fusion_prune" / "cli").glob("*.py")), ids=lambda p: p.name)
def test_cli_commands_are_thin(path):
    """Each command is a function of ~60 lines at most that parses options and calls the library."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", getattr(d.func, "id", "")) == "command"
                for d in node.decorator_list):
            body = node.end_lineno - (node.body[0].end_lineno if isinstance(node.body[0], ast.Expr) else node.lineno)
            assert body <= 60, f"{path.name}:{node.name} has {body} lines of body"
