"""The package layout stays what DESIGN.md says: no import cycles, layers that import downwards only.

Read from the source with `ast` (nothing is imported), so a violation is reported with the file
and line that introduced it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "agentkiln"
MAX_LINES = 450
# Modules allowed over MAX_LINES, each with the reason.
LONG_MODULES: dict[str, str] = {
    "agentkiln/models.py": "every wire record in one place (DESIGN.md data model); a split scatters the contract",
    "agentkiln/protocol.py": "every route, header and span key declared once; a split invites a second spelling",
}

# Which packages each package must never import (at any level, lazily or not).
FORBIDDEN = {
    "agentkiln.protocol": ("agentkiln.",),  # the wire protocol depends on nothing of ours
    "agentkiln.runner": ("agentkiln.gateway", "agentkiln.server", "agentkiln.engine", "agentkiln.training",
                         "agentkiln.algorithms"),
    "agentkiln.gateway": ("agentkiln.runner", "agentkiln.training", "agentkiln.algorithms", "agentkiln.server"),
    "agentkiln.engine": ("agentkiln.runner", "agentkiln.gateway", "agentkiln.server", "agentkiln.training",
                         "agentkiln.algorithms"),
    "agentkiln.store": ("agentkiln.runner", "agentkiln.gateway", "agentkiln.server", "agentkiln.engine",
                        "agentkiln.training", "agentkiln.algorithms"),
    "agentkiln.adapter": ("agentkiln.runner", "agentkiln.gateway", "agentkiln.server", "agentkiln.engine"),
}  # fmt: skip
# Third-party packages the client SDK (a runner-only install) must not import at module level.
CLIENT_PACKAGES = ("agentkiln.protocol", "agentkiln.models", "agentkiln.runner", "agentkiln.store.client")
HEAVY = ("torch", "transformers", "peft", "matplotlib", "fastapi", "uvicorn", "starlette")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, module: str, top_level_only: bool) -> Iterator[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield node
            if not top_level_only:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        yield from walk([child])

    for node in walk(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # `from pkg import submodule`
                yield f"{name}.{alias.name}", node.lineno


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name, _ in _imports(path, mod, top_level_only):
            if name in mods and name != mod:
                graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its submodules is not a cycle with them."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_cycles_even_through_lazy_imports() -> None:
    cycles = _cycles(_package_edges_removed(_graph(top_level_only=False)))
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downwards_only() -> None:
    bad = []
    for mod, path in _modules().items():
        for owner, banned in FORBIDDEN.items():
            if mod != owner and not mod.startswith(owner + "."):
                continue
            for name, line in _imports(path, mod, top_level_only=False):
                if any(name.startswith(b) for b in banned) and not name.startswith(owner):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_client_sdk_imports_no_training_or_server_stack_at_module_level() -> None:
    bad = []
    for mod, path in _modules().items():
        if not any(mod == c or mod.startswith(c + ".") for c in CLIENT_PACKAGES):
            continue
        for name, line in _imports(path, mod, top_level_only=True):
            if name.split(".")[0] in HEAVY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_modules_stay_small() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONG_MODULES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them or give the reason in LONG_MODULES): {long}"
