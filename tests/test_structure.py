"""Structure rules of the code base, checked on the source (no sockets, no imports run).

- one module imports trio-asyncio (fleetgate/ssh/bridge.py): every trio↔asyncio crossing is there;
- one module uses asyncssh's private names (fleetgate/ssh/internals.py), guarded for the pinned version;
- no import cycle among fleetgate's modules, counting every import (function-level and
  TYPE_CHECKING ones too: a cycle there is still two modules that cannot be read apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fleetgate"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def is_package(name: str) -> bool:
    return (PKG.parent / Path(*name.split(".")) / "__init__.py").exists()


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The fleetgate modules `name` imports (a package's submodule when `from pkg import sub`)."""
    package = name if is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fleetgate":
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "fleetgate":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out.update(subs or [mod])
            if subs and len(subs) < len(node.names):
                out.add(mod)
    return {m for m in out if m in known and m != name}


def test_one_module_imports_trio_asyncio():
    users = sorted({name for name, tree in modules().items()
                   for node in ast.walk(tree)
                   if (isinstance(node, ast.Import) and any(a.name.startswith("trio_asyncio") for a in node.names))
                   or (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trio_asyncio"))})
    assert users == ["fleetgate.ssh.bridge"]


def test_one_module_uses_asyncssh_private_names():
    """A private name (`x._y`) that fleetgate does not define itself is asyncssh's (or another
    library's): only internals.py may touch those, and bridge.py trio-asyncio's (it imports
    nothing of asyncssh, so what it touches can only be trio-asyncio's)."""
    mods = modules()
    defined: set[str] = {"_replace", "_asdict", "_fields", "_make"}  # namedtuple's public API
    for tree in mods.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                defined.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        defined.add(t.id)
    foreign: dict[str, set[str]] = {}
    for name, tree in mods.items():
        if name in ("fleetgate.ssh.internals", "fleetgate.ssh.bridge"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in defined:
                foreign.setdefault(name, set()).add(node.attr)
    assert foreign == {}
    bridge_imports = {a.name for node in ast.walk(mods["fleetgate.ssh.bridge"]) if isinstance(node, ast.Import)
                      for a in node.names} | {node.module or "" for node in ast.walk(mods["fleetgate.ssh.bridge"])
                                              if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith("asyncssh") for m in bridge_imports), bridge_imports


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_fleetgate_modules():
    mods = modules()
    known = set(mods)
    graph = {name: imports(name, tree, known) for name, tree in mods.items()}
    assert graph["fleetgate.app"], "the import scan found nothing: the test itself is broken"
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
