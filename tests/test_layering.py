"""Which way imports run: data <- models <- trainer <- tools, and no module-level import cycle.

Every .py under data/, models/, trainer/ and tools/ is parsed with `ast`; imports inside functions count
as much as those at the top (a deferred import is still a dependency).  A failure names file:line.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "trainer", "tools")
# package -> the packages it must not import
FORBIDDEN = {"data": {"models", "trainer", "tools"}, "models": {"trainer", "tools"},
             "trainer": {"tools"}, "tools": set()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> List[Tuple[int, str, bool]]:
    """(line, imported module, at module level) for every absolute or relative import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when it is a module
            names = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                     for alias in node.names]
        else:
            continue
        found += [(node.lineno, name, id(node) in top_level) for name in names if name]
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources() -> List[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_package_is_parsed():
    assert {p.relative_to(ROOT).parts[0] for p in _sources()} == set(PACKAGES)


def test_imports_run_one_way():
    problems = []
    for path in _sources():
        layer = path.relative_to(ROOT).parts[0]
        for line, name, _ in _imports(path):
            if name.split(".")[0] in FORBIDDEN[layer]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
    problems = list(dict.fromkeys(problems))  # one line per offending import statement
    assert not problems, ("imports against the layering (data <- models <- trainer <- tools):\n"
                          + "\n".join(problems))


def _module_graph() -> Tuple[Dict[str, Set[str]], Dict[Tuple[str, str], str]]:
    graph: Dict[str, Set[str]] = {}
    where: Dict[Tuple[str, str], str] = {}
    for path in _sources():
        module = _module_name(path)
        graph.setdefault(module, set())
        for line, name, top in _imports(path):
            if not top or name.split(".")[0] not in PACKAGES or name == module:
                continue
            while name and not _is_module(name):  # `from a.b import f`: the edge goes to module a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
                where.setdefault((module, name), f"{path.relative_to(ROOT)}:{line}")
    return graph, where


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle as [a, b, ..., a], or [] when the graph is acyclic (iterative DFS)."""
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return []


def test_no_module_level_import_cycle():
    graph, where = _module_graph()
    cycle = _find_cycle(graph)
    edges = [f"{where[(a, b)]}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "module-level import cycle:\n" + "\n".join(edges)


def test_the_checks_catch_a_bad_import(tmp_path):
    """The cycle finder and the layering rule see what they must (guards the test against passing
    vacuously)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []
    assert "trainer" in FORBIDDEN["models"] and "tools" in FORBIDDEN["trainer"]
