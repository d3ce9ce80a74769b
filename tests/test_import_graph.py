"""The import graph: kernels/ at the bottom, no cycles, the library apart from the application
(``fastvq.app``), and fastvq's torch path never needs Triton."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastvq import ops

ROOT = Path(__file__).resolve().parents[1]

# Library modules that are application code all the same: the documented import paths
# `fastvq.train` and `fastvq.data`, kept as re-exports of fastvq.app (docs/models.md).
APP_SHIMS = {"fastvq.train", "fastvq.data"}


def _module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name: fastvq/ and kernels/ (which
    installs as fastvq.kernels)."""
    files = {}
    for top, pkg in ((ROOT / "fastvq", "fastvq"), (ROOT / "kernels", "fastvq.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = [pkg, *path.relative_to(top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _imports(name: str, path: Path, modules) -> set[str]:
    """The fastvq modules that ``name`` imports anywhere in its file (function-level imports
    included), relative imports resolved; ``from P import x`` counts as P.x when that is a
    module, as P otherwise."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets += [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                        for a in node.names]  # fmt: skip
    out = set()
    for t in targets:
        if t != "fastvq" and not t.startswith("fastvq."):
            continue
        while t not in modules:  # `import fastvq.a.b` where b is a name: the module a
            t = t.rpartition(".")[0]
        if t != name:
            out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_app(name: str) -> bool:
    return name == "fastvq.app" or name.startswith("fastvq.app.") or name in APP_SHIMS


def test_graph_sees_the_packages_modules():
    graph = _graph()
    assert {"fastvq", "fastvq.ops", "fastvq.app.cli", "fastvq.kernels"} <= set(graph)
    assert "fastvq.app.checkpoint" in graph["fastvq.app.loop"]  # relative imports resolved
    assert "fastvq.kernels.vq_search" in graph["fastvq._search_triton"]


def test_no_import_cycles():
    """No two fastvq modules import each other, directly or through others, counting the imports
    inside functions: a lazy import hides a cycle from Python but not from a reader."""
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_library_never_imports_the_application():
    """fastvq.app (the CLI, training loop, checkpoints, demo) builds on the library; the
    library never needs it. Only the documented shims (APP_SHIMS) re-export it."""
    graph = _graph()
    assert APP_SHIMS <= set(graph), "a documented shim is gone: update APP_SHIMS"
    bad = {
        f"{name} -> {dep}"
        for name, deps in graph.items()
        if not _is_app(name)
        for dep in deps
        if _is_app(dep)
    }
    assert not bad, f"library modules import the application: {sorted(bad)}"


def test_shims_reexport_the_application():
    import fastvq.data
    import fastvq.train
    from fastvq.app import checkpoint, data, loop, rng

    assert fastvq.train.load_run is checkpoint.load_run
    assert fastvq.train.fit is loop.fit
    assert fastvq.train.seed_everything is rng.seed_everything
    assert fastvq.data.load_dataset is data.load_dataset
    assert fastvq.data.IDXError is data.IDXError
    for shim in (fastvq.train, fastvq.data):
        assert all(hasattr(shim, n) for n in shim.__all__)


def test_kernels_import_nothing_from_fastvq():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not any(n == "fastvq" or n.startswith("fastvq.") for n in names), (
                f"{path.name} imports {names}: kernels/ must not import fastvq"
            )


BLOCKED = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
import fastvq
assert not fastvq.triton_available()
z, c = torch.randn(50, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
idx, zq, err = fastvq.search(z, c)  # "auto" on CPU: the torch backend
assert torch.equal(idx, torch.cdist(z, c).argmin(1))
out = fastvq.vector_quantize(z, c, backend="auto")
(out.quantized.sum() + out.loss).backward()
assert z.grad is not None and c.grad is not None
layer = fastvq.VectorQuantizer(8, 16)
q, i, loss = layer(torch.randn(4, 10, 8))
fastvq.scatter_rows(idx, z.detach(), 20)
try:
    fastvq.search(z, c, backend="triton")
except ValueError as exc:
    assert "Triton" in str(exc), exc
else:
    raise AssertionError("backend='triton' without Triton must raise")
assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def test_torch_backend_works_with_triton_blocked():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_broken_kernels_warn_once_on_cuda(monkeypatch):
    """Triton installed but the kernels fail to import: CUDA tensors warn (once), not silently."""
    monkeypatch.setattr(ops, "_triton_import_error", lambda: "ImportError: no fastvq.kernels")
    ops._warn_triton_broken.cache_clear()
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="no fastvq.kernels"):
        assert ops.resolve_backend("auto", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", cuda) == "torch"  # the second time: silent
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"  # CPU never warns
    ops._warn_triton_broken.cache_clear()
