"""The skeleton's rules, checked on the source: no module reads another object's private
attribute, the layer class stays thin, and no class grows past 400 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastvq"


def _external_roots(tree: ast.Module) -> set:
    """Names bound by imports of other libraries (torch, triton, ...): their private APIs are
    theirs to keep, not a reach into a fastvq object."""
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not a.name.startswith("fastvq"):
                    roots.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if not (node.module or "").startswith("fastvq"):
                roots.update(a.asname or a.name for a in node.names)
    return roots


def _root(node):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_accesses(path: Path) -> list:
    """``obj._name`` (not dunder) where ``obj`` is neither ``self`` nor ``cls`` nor rooted in
    another library's import."""
    tree = ast.parse(path.read_text())
    own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    allowed = {"self", "cls", "super"} | _external_roots(tree) | own_classes
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if _root(node.value) in allowed and not isinstance(node.value, ast.Name | ast.Call):
            continue  # torch.nn.X._private: another library's API
        if isinstance(node.value, ast.Name) and node.value.id in allowed - {"self", "cls"}:
            continue
        if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            if node.value.func.id == "super":
                continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{name}")
    return found


def test_no_module_reads_another_objects_private_attribute():
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in private_accesses(p)]
    assert not found, "private attributes read across objects:\n" + "\n".join(found)


def test_the_scan_sees_a_private_access(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("import torch\n\ndef f(layer):\n    torch._C.x\n    return layer._state()\n")
    hits = private_accesses_at(src)
    assert len(hits) == 1 and hits[0].endswith("._state"), hits


def private_accesses_at(path: Path) -> list:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return private_accesses(path)
    finally:
        ROOT = saved


def _classes():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                yield path, node.name, node.end_lineno - node.lineno + 1


def test_vector_quantizer_is_thin():
    sizes = {name: n for path, name, n in _classes() if path.name == "layer.py"}
    assert sizes["VectorQuantizer"] <= 250, sizes


def test_no_class_over_400_lines():
    big = [f"{p.relative_to(ROOT)}: {name} ({n} lines)" for p, name, n in _classes() if n > 400]
    assert not big, big
