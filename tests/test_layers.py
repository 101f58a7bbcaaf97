"""The package's import graph runs one way (docs/DESIGN.md): entry points -> inputs -> gradients
-> backends -> solvers -> core types, with no import circles.  Read from the source (every
``import`` statement, also the ones inside functions), so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
import pathlib

import pydiffbridge

ROOT = pathlib.Path(pydiffbridge.__file__).parent

# (rank, module-name prefixes); a module takes the rank of its longest matching prefix
LAYERS = [
    (0, ["errors", "solution", "_validate", "_options", "_resources", "checkpoint"]),
    (1, ["solvers"]),
    (2, ["backends", "_julia"]),
    (3, ["gradients"]),
    (4, ["_prepare", "_tree"]),
    (5, ["api", "batched_api", "dense", "ensemble"]),
    (6, ["", "__main__", "nn", "bench", "cli", "demo", "fit", "distributed"]),
]


def _rank(mod: str) -> int:
    best, rank = -1, None
    for r, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".") or p == "") and len(p) > best:
                best, rank = len(p), r
    return rank


def _graph() -> dict[str, set[str]]:
    names = set()
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    edges: dict[str, set[str]] = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_pkg else parts)
        pkg = parts[:-1] if is_pkg else parts[:-1]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - (node.level - 1)]
                elif node.module and node.module.split(".")[0] == "pydiffbridge":
                    base = []
                    node = ast.ImportFrom(module=node.module.partition(".")[2] or None,
                                          names=node.names, level=1)
                else:
                    continue
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:  # `from . import x` may name a submodule
                    sub = f"{target}.{a.name}" if target else a.name
                    out.add(sub if sub in names else target)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "pydiffbridge":
                        out.add(a.name.partition(".")[2])
        edges[mod] = {o for o in out if o != mod}
    return edges


def test_every_module_has_a_layer():
    assert all(_rank(m) is not None for m in _graph())


def test_imports_never_point_upwards():
    bad = [f"{m} (layer {_rank(m)}) imports {o} (layer {_rank(o)})"
           for m, outs in _graph().items() for o in outs
           if _rank(o) > _rank(m) and not o.startswith(m + ".")]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = _graph()
    # a package's __init__ re-exporting its submodules is not a circle (the parent loads them)
    edges = {m: {o for o in outs if not (o.startswith(m + ".") or m == "")}
             for m, outs in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for o in sorted(edges.get(m, ())):
            if state.get(o) == 1:
                cycles.append(" -> ".join(path[path.index(o):] + [o]))
            elif o not in state:
                visit(o, path + [o])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_test_sees_lazy_imports():
    # the check must see imports made inside functions too (a lazy import is still a circle)
    assert "solvers.events" in _graph()["gradients.common"]
