"""The house rules, read from the code's own imports (ast, every import: top-level and inside
functions): arrows run one way between rooms, and no module takes part in an import circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Rooms from the top down; a module may import its own room and any room below it, never one
# above. The store is a leaf that the daemon and the job process (workers) both use. The dashboard
# (web) sits above the bridge: it shows the bridge's state through bridge.github.status_summary.
ROOMS = ["cli", "guard", "web", "bridge", "daemon", "workers", "jobs", "records", "harness", "models",
         "store", "common", "config"]
RANK = {room: i for i, room in enumerate(ROOMS)}
# Rooms that share a rank: neither may import the other.
PEERS = [{"records", "harness"}, {"models", "store"}]


def room_of(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in RANK else None


def ours(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        single = root / f"{room}.py"
        if single.is_file():
            out[room] = single
        for path in sorted((root / room).rglob("*.py")) if (root / room).is_dir() else []:
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `module` imports (a `from pkg import name` of a submodule
    counts as importing that submodule)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return {m for m in found if m in known}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = ours(root)
    known = set(modules)
    return {m: imports_of(m, p, known) - {m} for m, p in modules.items()}


def _rank(module: str) -> int:
    return RANK[room_of(module)]  # type: ignore[index]


def upward(g: dict[str, set[str]]) -> list[str]:
    """Imports that run up (or sideways between peers) from one room to another."""
    wrong = []
    for src, targets in g.items():
        for dst in targets:
            a, b = room_of(src), room_of(dst)
            if a != b and (_rank(dst) <= _rank(src) or {a, b} in PEERS):
                wrong.append(f"{src} -> {dst}")
    return sorted(wrong)


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_arrows_run_one_way():
    assert not upward(graph()), "imports that run up between rooms: " + ", ".join(upward(graph()))


def test_nothing_imports_the_cli():
    assert not [m for m, t in graph().items() if "cli" in t]


def test_no_import_circles():
    assert not circles(graph())


def test_the_rules_can_fail(tmp_path: Path):
    """A made-up tree where the store imports the scheduler, inside a function, and the scheduler
    imports the store: both rules see it."""
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "__init__.py").write_text("")
    (tmp_path / "daemon" / "scheduler.py").write_text("from store import Store\n")
    (tmp_path / "store.py").write_text("def f():\n    from daemon import scheduler\n")
    g = graph(tmp_path)
    assert upward(g) == ["store -> daemon", "store -> daemon.scheduler"]
    assert circles(g) == [["daemon.scheduler", "store"]]
