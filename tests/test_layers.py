"""The import graph of the package (docs/architecture.md, "Import layering"): no cycle, and no
module imports one from a higher layer, checked on the source with ast (imports inside
functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "packptq"

#: module (or package prefix) -> layer; a module may import only from its own layer or below
LAYERS = {
    "packptq": 0, "packptq.config": 0, "packptq.registry": 0, "packptq.artifacts": 1,
    "packptq.quant": 2, "packptq.zoo": 2, "packptq.data": 2,
    "packptq.evaluate": 3, "packptq.runtime": 3, "packptq.twins": 3,
    "packptq.scores": 4, "packptq.packing": 5, "packptq.mp": 4, "packptq.recon": 4, "packptq.fp": 4,
    "packptq.calibration": 4, "packptq.report": 4,
    "packptq.export": 5, "packptq.schemas": 6, "packptq.pipeline": 6, "packptq.api": 7, "packptq.cli": 7,
    "packptq.__main__": 7,
}
#: the package root re-exports the public verbs (``packptq.quantize``, ``load_quantized``)
#: lazily: as an importer it stands above every layer
FACADE_LAYER = 8


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("packptq"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if (PKG.parent / node.module.replace(".", "/") / a.name).exists()
                       or (PKG.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("packptq"))
    return out


GRAPH = {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_every_module_has_a_layer():
    assert all(any(m == k or m.startswith(k + ".") for k in LAYERS) for m in GRAPH), sorted(GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    own = FACADE_LAYER if module == "packptq" else layer(module)
    up = sorted(i for i in GRAPH[module] if layer(i) > own)
    assert not up, f"{module} (layer {layer(module)}) imports {up}"


def test_no_import_cycle():
    def package_of(m: str) -> str:  # a package and its modules count as one node
        for k in sorted(LAYERS, key=len, reverse=True):
            if m == k or m.startswith(k + "."):
                return k
        return m

    edges = {}
    for m, deps in GRAPH.items():
        edges.setdefault(package_of(m), set()).update(package_of(d) for d in deps if package_of(d) != package_of(m))
    state = {}

    def visit(n, path):
        state[n] = "open"
        for d in edges.get(n, ()):
            if d == "packptq":
                continue
            assert state.get(d) != "open", " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in list(edges):
        if n not in state:
            visit(n, [n])
