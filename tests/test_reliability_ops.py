"""Issue 11 items 1 and 4: ``scatter_rows`` never writes out of bounds, and the public ``search``
and ``scatter_rows`` reject bad input with ``vector_quantize``'s errors.

The out-of-range kernel calls run in a child process: a regression corrupts the heap (glibc
abort) or segfaults, which must fail one test rather than kill pytest.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvq

# Calls the registered op (no argument checks) with indices outside [0, K), on one backend, for
# each K and summation path; compares with a reference dropping those rows. One child per backend
# (a fresh interpreter costs about 6 s here): a crash names the case it was in.
_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastvq  # registers torch.ops.fastvq.scatter_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    be, D = sys.argv[1], 5
    for K in (0, 37):
        for det in (False, True):
            print(f"case K={K} deterministic={det}", flush=True)
            bad = [K, -1, K + 1, 2**40, -(2**40), 2**62]
            good = [0, K // 2, K - 1] * 30 if K else []
            idx = torch.tensor(good + bad * 20, device=device)
            rows = torch.randn(idx.numel(), D, device=device)
            keep = (idx >= 0) & (idx < K)
            ref = torch.zeros(K, D, dtype=torch.float64).index_add_(
                0, idx[keep].cpu(), rows[keep].double().cpu())
            out = torch.ops.fastvq.scatter_rows(idx, rows, K, be, det)
            if device == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (K, D), out.shape
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
            print("OK", flush=True)
    """
)


def test_out_of_range_indices_never_write_out_of_bounds(backend):
    """K = 0 and 37, atomic and deterministic summation."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, backend],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.count("OK") == 4, (
        f"child exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    )


def test_unchecked_entry_drops_out_of_range_rows(backend, device):
    """The internal entry used by backward, EMA and k-means: no checks, no sync, rows outside
    [0, K) add to no code."""
    idx = torch.tensor([0, 3, 4, -1, 2], device=device)
    rows = torch.ones(5, 2, device=device)
    out = fastvq.ops._scatter_rows_unchecked(idx, rows, 4, backend=backend)
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert fastvq.ops._scatter_rows_unchecked(idx, rows, 0, backend=backend).shape == (0, 2)


@pytest.mark.parametrize("bad", [4, -1, 2**40])
@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_rows_rejects_out_of_range(backend, device, bad, deterministic):
    idx = torch.tensor([0, 3, bad, 1], device=device)
    with pytest.raises(ValueError, match=rf"\[0, 4\).*indices\[2\] = {bad}"):
        fastvq.scatter_rows(idx, torch.ones(4, 3, device=device), 4, backend=backend,
                            deterministic=deterministic)  # fmt: skip


I64 = torch.int64


@pytest.mark.parametrize(
    "indices, rows, num_codes, exc, match",
    [
        ([0, 1], torch.zeros(2, 3), 4, TypeError, "indices must be a torch.Tensor"),
        (torch.zeros(2, dtype=I64), [[0.0]], 4, TypeError, "rows must be a torch.Tensor"),
        (torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3), 4, TypeError, "indices must be"),
        (torch.zeros(2), torch.zeros(2, 3), 4, TypeError, "indices must be int64"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3, dtype=torch.float64), 4, TypeError, "rows"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3, dtype=I64), 4, TypeError, "rows must be"),
        (torch.zeros(2, 1, dtype=I64), torch.zeros(2, 3), 4, ValueError, r"indices must have"),
        (torch.zeros(2, dtype=I64), torch.zeros(2), 4, ValueError, r"rows must have shape"),
        (torch.zeros(3, dtype=I64), torch.zeros(2, 3), 4, ValueError, "same length"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3), 0, ValueError, "num_codes must be >= 1"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3), -3, ValueError, "num_codes must be >= 1"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3), 2.0, TypeError, "num_codes must be an int"),
        (torch.zeros(2, dtype=I64), torch.zeros(2, 3), True, TypeError, "num_codes must be an"),
    ],
)
def test_scatter_rows_bad_input(indices, rows, num_codes, exc, match):
    with pytest.raises(exc, match=match):
        fastvq.scatter_rows(indices, rows, num_codes)


def test_scatter_rows_device_mismatch_and_empty(backend, device):
    with pytest.raises(ValueError, match="indices and rows must be on the same device"):
        fastvq.scatter_rows(torch.zeros(2, dtype=I64, device="meta"), torch.zeros(2, 3), 4)
    out = fastvq.scatter_rows(
        torch.zeros(0, dtype=I64, device=device), torch.zeros(0, 3, device=device), 4,
        backend=backend,
    )  # fmt: skip
    assert out.shape == (4, 3) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "z2d, codebook, exc, match",
    [
        (torch.zeros(4, 8), torch.zeros(10, 9), ValueError, r"z2d's last dim \(8\) must equal"),
        (torch.zeros(4, 8), torch.zeros(0, 8), ValueError, "K >= 1"),
        (torch.zeros(4, 0), torch.zeros(10, 0), ValueError, "D >= 1"),
        (torch.zeros(8), torch.zeros(10, 8), ValueError, r"z2d must have shape \(N, D\)"),
        (torch.zeros(2, 4, 8), torch.zeros(10, 8), ValueError, r"z2d must have shape \(N, D\)"),
        (torch.zeros(()), torch.zeros(10, 8), ValueError, "z2d must have shape"),
        (torch.zeros(4, 8), torch.zeros(10, 8, 1), ValueError, "codebook must have shape"),
        (torch.zeros(4, 8, dtype=I64), torch.zeros(10, 8), TypeError, "z2d must be float32"),
        (torch.zeros(4, 8), torch.zeros(10, 8, dtype=torch.int32), TypeError, "codebook must"),
        (torch.zeros(4, 8, dtype=torch.float64), torch.zeros(10, 8), TypeError, "float64"),
        ([[1.0, 2.0]], torch.zeros(10, 2), TypeError, "z2d must be a torch.Tensor"),
        (torch.zeros(4, 8), "codes", TypeError, "codebook must be a torch.Tensor"),
    ],
)
def test_search_bad_input(backend, z2d, codebook, exc, match):
    with pytest.raises(exc, match=match):
        fastvq.search(z2d, codebook, backend=backend)


def test_search_device_mismatch():
    with pytest.raises(ValueError, match="z2d and codebook must be on the same device"):
        fastvq.search(torch.zeros(4, 8, device="meta"), torch.zeros(10, 8))


def test_search_empty_batch(backend, device):
    idx, z_q, err = fastvq.search(
        torch.zeros(0, 8, device=device), torch.randn(10, 8, device=device), backend=backend
    )
    assert idx.shape == (0,) and z_q.shape == (0, 8) and err.shape == (0,)
