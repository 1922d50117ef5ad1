"""The import graph of the package (docs/architecture.md, "Import layering"), module by module:
no cycle, also inside a package, and no module imports one from a higher layer. Read from the
source with ast, so imports inside functions and under ``TYPE_CHECKING`` count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "packptq"

#: module (or package prefix) -> layer; a module may import only from its own layer or below
LAYERS = {
    "packptq": 0, "packptq.config": 0, "packptq.registry": 0, "packptq.version": 0, "packptq.artifacts": 1,
    "packptq.quant": 2, "packptq.zoo": 2, "packptq.data": 2,
    "packptq.evaluate": 3, "packptq.runtime": 3, "packptq.twins": 3, "packptq.context": 3,
    "packptq.scores": 4, "packptq.packing": 5, "packptq.mp": 4, "packptq.recon": 4, "packptq.fp": 4,
    "packptq.calibration": 4, "packptq.report": 4,
    "packptq.export": 5, "packptq.settings": 5, "packptq.schemas": 6, "packptq.pipeline": 6,
    "packptq.api": 7, "packptq.cli": 7, "packptq.__main__": 7,
}
#: the package root re-exports the public verbs (``packptq.quantize``, ``load_quantized``)
#: lazily: as an importer it stands above every layer, and nothing imports it
FACADE_LAYER = 8


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> set:
    """The packptq modules ``path`` imports: ``from pkg import sub`` names the submodule
    ``pkg.sub`` (the package itself is only initialised on the way), ``from mod import name``
    the module ``mod``, ``import a.b`` the module ``a.b``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("packptq"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out.update(subs)
            if len(subs) < len(node.names):  # names defined in the module (a package's __init__)
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("packptq"))
    return out


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert all(any(m == k or m.startswith(k + ".") for k in LAYERS) for m in GRAPH), sorted(GRAPH)


def test_the_graph_sees_function_level_imports():
    """The reader finds an import inside a function (``cli`` imports ``pipeline`` there)."""
    assert "packptq.pipeline" in GRAPH["packptq.cli"]
    assert "packptq.recon.cost" in GRAPH["packptq.recon.sequence"]  # from packptq.recon import cost


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    own = FACADE_LAYER if module == "packptq" else layer(module)
    up = sorted(i for i in GRAPH[module] if layer(i) > own)
    assert not up, f"{module} (layer {layer(module)}) imports {up}"


def cycles(graph: dict) -> list:
    """Every import cycle of ``graph`` found by a depth-first search, as module paths."""
    state, found = {}, []

    def visit(n, path):
        state[n] = "open"
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_the_cycle_search_finds_a_cycle_inside_a_package():
    assert cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p": {"p.a"}}) == [["p.a", "p.b", "p.c", "p.a"]]
    assert cycles({"p.a": {"p.b"}, "p.b": set(), "p": {"p.a", "p.b"}}) == []


def test_no_import_cycle_between_modules():
    facade = {m: deps - {"packptq"} for m, deps in GRAPH.items()}  # the lazy root: see FACADE_LAYER
    assert not any("packptq" in deps for m, deps in GRAPH.items() if m != "packptq"), "a module imports the root"
    assert cycles(facade) == []
