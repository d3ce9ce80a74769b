"""The README's `pip install -e ".[dev]"` has none of the optional peers (the extras bench:
vector-quantize-pytorch and faiss-cpu; compat: diffusers; export: onnx, onnxruntime,
onnxscript). Every test module that uses one must still collect without it (the peer imported
only after a module-level ``pytest.importorskip``, in a ``try``, or inside the test), and carry
the ``extras`` marker: CI's second phase (.ci/run), after installing the extras, runs
``pytest -m extras``, exactly the tests that skipped before."""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PEERS = {"vector_quantize_pytorch", "diffusers", "faiss", "onnx", "onnxruntime", "onnxscript"}
MODULES = sorted(p for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)


def _imported(node: ast.AST) -> set[str]:
    """Top-level names of the peers that an import statement or importorskip call brings in."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
    elif (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "importorskip"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        names = [str(node.args[0].value)]
    else:
        return set()
    return {n.split(".")[0] for n in names} & PEERS


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_optional_peers_are_guarded_and_marked(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[str] = set()
    for stmt in tree.body:  # module level, in order: an import must follow its importorskip
        if isinstance(stmt, ast.Try):
            continue  # try: import ... except ImportError: the tests check for None
        calls = {n for c in ast.walk(stmt) if isinstance(c, ast.Call) for n in _imported(c)}
        skipped |= calls
        unguarded = _imported(stmt) - skipped
        assert not unguarded, f"{path.name}:{stmt.lineno} imports {unguarded} unguarded"
    uses = {n for node in ast.walk(tree) for n in _imported(node)}
    if uses:
        assert "pytest.mark.extras" in path.read_text(encoding="utf-8"), (
            f"{path.name} uses {sorted(uses)} but has no pytest.mark.extras test"
        )
