"""kernels/ sits at the bottom of the import graph, and fastvq's torch path never needs Triton."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastvq import ops

ROOT = Path(__file__).resolve().parents[1]


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
