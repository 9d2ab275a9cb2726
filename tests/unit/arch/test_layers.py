"""The dependency rule of ARCHITECTURE.md, checked on every import in the source tree.

Each layer may import only the layers below it (and itself); `nfs/` and `iscsi/` stand alone.
Imports inside functions and under TYPE_CHECKING count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("emu", "nfs", "iscsi")

# layer -> the layers (and outside packages of ours) it may import
ALLOWED: dict[str, set[str]] = {
    "emu.kernel": set(),
    "emu.util": set(),
    "emu.traffic": set(),
    "emu.mm": {"emu.kernel"},
    "emu.net": {"emu.kernel", "emu.mm"},
    "emu.swapdev": {"emu.kernel", "emu.mm", "emu.net", "nfs", "iscsi"},
    "emu.scenario": {"emu.kernel", "emu.util"},
    "emu.peers": {"emu.util", "nfs", "iscsi"},
    "emu.host": {"emu.kernel", "emu.mm", "emu.net", "emu.swapdev", "emu.traffic", "emu.util", "emu.scenario",
                 "emu.peers"},
    "emu.sweep": {"emu.host", "emu.scenario", "emu.util"},
    # the top: commands, benchmarks and the CLI may use everything
    "emu.commands": {"*"},
    "emu.bench": {"*"},
    "emu.cli": {"*"},
    "emu.__main__": {"*"},
    "emu": set(),  # emu/__init__.py
    "nfs": set(),
    "iscsi": set(),
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("nfs", "iscsi"):
        return parts[0]
    if len(parts) == 1:
        return "emu"
    return f"emu.{parts[1]}"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, *, typing_only: bool = True) -> list[tuple[int, str]]:
    """Every import of ours in `path` (`typing_only=False`: not those under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    out = []
    skip: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:  # `from emu import scenario` imports the module emu.scenario
                sub = f"{name}.{alias.name}"
                path_guess = ROOT / Path(*sub.split("."))
                out.append((node.lineno, sub if path_guess.with_suffix(".py").exists() or path_guess.is_dir() else name))
    return [(line, name) for line, name in out if name.split(".")[0] in PACKAGES]


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_source_file_is_in_a_known_layer() -> None:
    assert SOURCES
    for path in SOURCES:
        assert layer_of(module_name(path)) in ALLOWED, f"{path}: no layer in ARCHITECTURE.md"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_rule(path: Path) -> None:
    me = layer_of(module_name(path))
    allowed = ALLOWED[me]
    bad = []
    for line, name in imports(path):
        target = layer_of(name)
        if target == me or "*" in allowed or target in allowed:
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {name} ({target})")
    assert not bad, "\n".join(bad)


def import_cycles(sources: list[Path], *, typing_only: bool = False) -> list[list[str]]:
    """Modules that import each other, directly or through others, when the code runs (imports
    inside functions count; those under TYPE_CHECKING do not: annotations only)."""
    mods = {module_name(p): p for p in sources}
    graph = {m: sorted({n for _, n in imports(p, typing_only=typing_only) if n in mods and n != m})
             for m, p in mods.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in order:
            visit(m)
    return cycles


def test_no_import_cycles() -> None:
    assert import_cycles(SOURCES) == []


def test_the_cycle_check_finds_one() -> None:
    # run.py calls collect.py, which names HostRun in annotations only (under TYPE_CHECKING)
    pair = [ROOT / "emu" / "host" / "run.py", ROOT / "emu" / "host" / "collect.py"]
    assert import_cycles(pair) == []
    assert import_cycles(pair, typing_only=True) == [["emu.host.collect", "emu.host.run"]]


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    # the checker itself must be able to fail
    assert layer_of("emu.mm.slab") == "emu.mm" and "emu.net" not in ALLOWED["emu.mm"]
    assert layer_of("nfs.client") == "nfs" and not ALLOWED["nfs"]
