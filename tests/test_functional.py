"""The fused op on both backends against an independent fp64 brute force and the literal formula."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq import _search_torch, vector_quantize

FP32_EPS = torch.finfo(torch.float32).eps


def oracle_dists(z, codebook):
    """fp64 brute-force squared distances (N, K) of the inputs as given (after dtype rounding)."""
    z64, c64 = z.reshape(-1, z.shape[-1]).double().cpu(), codebook.double().cpu()
    return torch.cdist(z64, c64).square()


def rounding_bound(z, codebook):
    """tau per row: two correct fp32 searches may disagree when the top-2 gap is below this."""
    z64, c64 = z.reshape(-1, z.shape[-1]).double().cpu(), codebook.double().cpu()
    d = z.shape[-1]
    return 8 * (d**0.5 + 2) * FP32_EPS * (z64.square().sum(1) + c64.square().sum(1).max())


def assert_nearest(idx, z, codebook):
    """Indices equal the oracle where the top-2 gap exceeds tau; else within tau of the best."""
    dist = oracle_dists(z, codebook)
    idx = idx.reshape(-1).cpu()
    tau = rounding_bound(z, codebook)
    best = dist.min(1).values
    chosen = dist.gather(1, idx[:, None]).squeeze(1)
    slack = chosen - best
    bad = (slack > tau).nonzero().flatten()
    assert bad.numel() == 0, f"rows {bad[:10].tolist()} picked a code worse than tau: {slack[bad]}"
    if dist.shape[1] > 1:
        top2 = dist.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0]) > tau
        ref = dist.argmin(1)
        mism = (clear & (idx != ref)).nonzero().flatten()
        assert mism.numel() == 0, f"rows {mism[:10].tolist()}: got {idx[mism]} want {ref[mism]}"


SHAPES = [
    (1, 1, 1),
    (1, 3, 3),
    (63, 1000, 3),
    (63, 3, 257),
    (17, 1000, 257),
    (64, 17, 16),
    (100, 300, 64),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(p):
    return f"N{p[0]}-K{p[1]}-D{p[2]}"


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN / -1 so a row a backend forgets to write fails loudly."""
    monkeypatch.setattr(_search_torch, "POISON_OUTPUTS", True)
    if fastvq.triton_available():
        from fastvq import _search_triton as vq_search

        monkeypatch.setattr(vq_search, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_search_matches_oracle(backend, device, poison, shape, dtype):
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(dtype)
    quantized, indices, loss = vector_quantize(z, codebook, backend=backend)
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert quantized.dtype == dtype and quantized.shape == z.shape
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_nearest(indices, z, codebook)
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=0)
    err = (z.double() - codebook[indices].double()).square().mean()
    torch.testing.assert_close(loss.double(), 1.25 * err, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(63, 1000, 3), (40, 100, 257)], ids=_id)
def test_mixed_dtypes(backend, device, shape):
    """autocast gives a bf16 z and an fp32 codebook: search in fp32, quantized in z's dtype."""
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(torch.bfloat16)
    codebook = torch.randn(k, d, device=device)
    quantized, indices, loss = vector_quantize(z, codebook, backend=backend)
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert_nearest(indices, z, codebook)
    torch.testing.assert_close(quantized, codebook[indices].to(torch.bfloat16), rtol=0, atol=0)


def test_backends_agree(device):
    if not fastvq.triton_available():
        pytest.skip("Triton is not importable here")
    z = torch.randn(200, 48, device=device)
    codebook = torch.randn(500, 48, device=device)
    a = vector_quantize(z, codebook, backend="torch")
    b = vector_quantize(z, codebook, backend="triton")
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=0)


def test_leading_dims_and_noncontiguous(backend, device):
    base = torch.randn(4, 33, 7, 2, device=device)
    z = base[..., 0].transpose(1, 2)  # (4, 7, 33), non-contiguous, D=33
    assert not z.is_contiguous()
    codebook = torch.randn(40, 66, device=device)[:, ::2]  # non-contiguous codebook
    quantized, indices, loss = vector_quantize(z, codebook, backend=backend)
    assert indices.shape == (4, 7) and quantized.shape == z.shape
    assert_nearest(indices, z, codebook)
    torch.testing.assert_close(quantized, codebook[indices], rtol=0, atol=0)


def test_ties_go_to_lowest_index(backend, device):
    """Bitwise-equal distances, inside one tile and across tiles: the lowest index wins."""
    d, k = 16, 300
    # Small integers and halves: every product and sum is exact in fp32, so equal codes give
    # bitwise-equal distances whatever order a GEMM sums in.
    codebook = torch.randint(-20, 20, (k, d), device=device).float()
    code = torch.randint(-3, 3, (d,), device=device).float()
    for j in (7, 8, 150, 299):  # 7/8 share a tile; 150 and 299 sit in later tiles of any size
        codebook[j] = code
    z = torch.stack([code, code + 0.5, code - 0.5])
    _, indices, _ = vector_quantize(z, codebook, backend=backend)
    assert indices.tolist() == [7, 7, 7]
    # every code identical: index 0
    _, indices, _ = vector_quantize(z, code.expand(k, d).contiguous(), backend=backend)
    assert indices.tolist() == [0, 0, 0]


def test_empty_batch(backend, device):
    codebook = torch.randn(10, 8, device=device, requires_grad=True)
    for shape in [(0, 8), (2, 0, 8)]:
        z = torch.randn(*shape, device=device, requires_grad=True)
        quantized, indices, loss = vector_quantize(z, codebook, backend=backend)
        assert indices.shape == shape[:-1] and quantized.shape == shape
        assert loss.item() == 0.0
        (quantized.sum() + loss).backward()
        assert z.grad.shape == z.shape
        assert torch.count_nonzero(codebook.grad) == 0


def literal_reference(z, codebook, indices, beta, w_out, w_loss):
    """Plain autograd through the literal VQ-VAE formula, in fp64."""
    z64 = z.detach().double().requires_grad_(z.requires_grad)
    c64 = codebook.detach().double().requires_grad_(codebook.requires_grad)
    z_q = c64[indices.reshape(-1)].reshape(z.shape)
    out = z64 + (z_q - z64).detach()
    loss = F.mse_loss(z64.detach(), z_q) + beta * F.mse_loss(z64, z_q.detach())
    total = (out * w_out).sum() + w_loss * loss
    leaves = [t for t in (z64, c64) if t.requires_grad]
    grads = torch.autograd.grad(total, leaves)
    it = iter(grads)
    return (next(it) if z.requires_grad else None), (next(it) if codebook.requires_grad else None)


@pytest.mark.parametrize("req", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_gradients_match_literal_formula(backend, device, req, dtype):
    beta = 0.3
    z = torch.randn(5, 13, 24, device=device).to(dtype).requires_grad_(req[0])
    codebook = torch.randn(70, 24, device=device).to(dtype).requires_grad_(req[1])
    quantized, indices, loss = vector_quantize(z, codebook, beta=beta, backend=backend)
    w_out = torch.randn_like(z, dtype=torch.float64)
    w_loss = 3.7
    total = (quantized.double() * w_out).sum() + w_loss * loss.double()
    total.backward()
    ref_z, ref_c = literal_reference(z, codebook, indices, beta, w_out, w_loss)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if req[0]:
        assert z.grad.dtype == dtype
        torch.testing.assert_close(z.grad.double(), ref_z, rtol=tol, atol=tol)
    if req[1]:
        assert codebook.grad.dtype == dtype
        torch.testing.assert_close(codebook.grad.double(), ref_c, rtol=tol, atol=tol)


def test_loss_only_and_output_only_backward(backend, device):
    z = torch.randn(30, 8, device=device, requires_grad=True)
    codebook = torch.randn(20, 8, device=device, requires_grad=True)
    quantized, indices, loss = vector_quantize(z, codebook, backend=backend)
    loss.backward()  # grad_q is None
    ref_z, ref_c = literal_reference(z, codebook, indices, 0.25, torch.zeros_like(z).double(), 1.0)
    torch.testing.assert_close(z.grad.double(), ref_z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(codebook.grad.double(), ref_c, rtol=1e-5, atol=1e-7)
    z.grad = None
    codebook.grad = None
    quantized, _, _ = vector_quantize(z, codebook, backend=backend)
    quantized.sum().backward()  # straight through only; the codebook gets no gradient
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    assert codebook.grad is None or torch.count_nonzero(codebook.grad) == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_rows(backend, device, deterministic):
    idx = torch.randint(0, 37, (500,), device=device)
    idx[:50] = 3  # a hot code
    rows = torch.randn(500, 19, device=device)
    out = fastvq.scatter_rows(idx, rows, 40, backend=backend, deterministic=deterministic)
    ref = torch.zeros(40, 19, dtype=torch.float64).index_add_(0, idx.cpu(), rows.double().cpu())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[37:]) == 0
    counts = fastvq.code_counts(idx, 40)
    assert counts.dtype == torch.float32 and counts.sum().item() == 500


def test_nan_policy_is_the_same_on_both_backends(backend, device):
    codebook = torch.randn(50, 6, device=device)
    codebook[3, 2] = float("nan")
    codebook[4, 0] = float("inf")
    z = torch.randn(20, 6, device=device)
    z[5] = codebook[3].nan_to_num(0.0)  # nearest would be code 3, which holds NaN
    z[7, 1] = float("nan")  # a NaN row
    z[8, 0] = float("inf")  # an Inf row
    _, indices, loss = vector_quantize(z, codebook, backend=backend)
    assert indices[7].item() == 0 and indices[8].item() == 0
    assert not torch.isin(indices, torch.tensor([3, 4], device=device)).any()
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="z holds NaN"):
        vector_quantize(z, codebook, backend=backend, check_finite=True)
    with pytest.raises(ValueError, match="codebook holds NaN"):
        vector_quantize(torch.zeros(2, 6, device=device), codebook, check_finite=True)


@pytest.mark.parametrize(
    "z, codebook, kwargs, exc, match",
    [
        (torch.zeros(4, 8), torch.zeros(10, 9), {}, ValueError, "last dim"),
        (torch.zeros(4, 8), torch.zeros(10, 8, 1), {}, ValueError, "codebook must have shape"),
        (torch.zeros(4, 8), torch.zeros(0, 8), {}, ValueError, "K >= 1"),
        (torch.zeros(4, 8, dtype=torch.int64), torch.zeros(10, 8), {}, TypeError, "z must be"),
        (torch.zeros(4, 8), torch.zeros(10, 8, dtype=torch.int32), {}, TypeError, "codebook must"),
        (torch.zeros(4, 8, dtype=torch.float64), torch.zeros(10, 8), {}, TypeError, "float64"),
        (torch.zeros(()), torch.zeros(10, 8), {}, ValueError, "0-dim"),
        ([1.0, 2.0], torch.zeros(10, 2), {}, TypeError, "z must be a torch.Tensor"),
        (torch.zeros(4, 8), torch.zeros(10, 8), {"backend": "cuda"}, ValueError, "backend"),
        (torch.zeros(4, 8), torch.zeros(10, 8), {"beta": -1.0}, ValueError, "beta"),
        (torch.zeros(4, 8), torch.zeros(10, 8), {"beta": "x"}, TypeError, "beta"),
    ],
)
def test_bad_input(z, codebook, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vector_quantize(z, codebook, **kwargs)


def test_device_mismatch():
    z = torch.zeros(4, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        vector_quantize(z, torch.zeros(10, 8))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        vector_quantize(torch.zeros(4, 8), torch.zeros(10, 8), backend="triton")


def test_import_without_triton():
    """fastvq imports and runs where Triton is absent; backend='triton' says why it can't."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, fastvq
        assert not fastvq.triton_available()
        q, i, l = fastvq.vector_quantize(torch.randn(5, 4), torch.randn(3, 4))
        assert i.shape == (5,)
        try:
            fastvq.vector_quantize(torch.randn(5, 4), torch.randn(3, 4), backend="triton")
        except ValueError as e:
            assert "Triton" in str(e), e
        else:
            raise AssertionError("no error")
        assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_torch_compile_traces_without_graph_break():
    """fullgraph=True fails on any graph break: the custom ops and the Function trace whole."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)
    codebook = torch.nn.Parameter(torch.randn(16, 8))

    def step(x):
        q, idx, loss = vector_quantize(lin(x), codebook, backend="torch")
        return (q.square().sum() + loss), idx

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(32, 8)
    total, idx = compiled(x)
    total.backward()
    g_lin, g_cb = lin.weight.grad.clone(), codebook.grad.clone()
    lin.weight.grad = None
    codebook.grad = None
    total_ref, idx_ref = step(x)
    total_ref.backward()
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(total, total_ref)
    torch.testing.assert_close(lin.weight.grad, g_lin)
    torch.testing.assert_close(codebook.grad, g_cb)


def test_torch_backend_memory_stays_far_below_nxk():
    """16384 x 65536 x 64 forward+backward: one N x K fp32 tensor would be 4 GiB."""
    code = textwrap.dedent(
        """
        import torch, fastvq
        from fastvq._procmem import proc_status_kib, reset_peak_rss
        z = torch.randn(16384, 64, requires_grad=True)
        codebook = torch.randn(65536, 64, requires_grad=True)
        fastvq.vector_quantize(torch.randn(8, 64), codebook[:8], backend="torch")  # warm up
        reset_peak_rss(required=True)
        base = proc_status_kib("VmHWM")
        q, i, loss = fastvq.vector_quantize(z, codebook, backend="torch")
        (q.sum() + loss).backward()
        print((proc_status_kib("VmHWM") - base) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mib = float(out.stdout.strip().splitlines()[-1])
    # z_q, grads and tiles: tens of MiB. 4 GiB is one N x K fp32 matrix.
    assert peak_mib < 256, f"peak RSS rose by {peak_mib:.0f} MiB"


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_split_k_matches(device, splits):
    """The small-N path splits K across programs and merges (min, index) pairs."""
    if not fastvq.triton_available():
        pytest.skip("Triton is not importable here")
    from fastvq._search_triton import vq_search_triton

    z = torch.randn(40, 24, device=device)
    codebook = torch.randint(-3, 3, (700, 24), device=device).float()
    codebook[650] = codebook[10]  # an exact tie across splits: the lower index must win
    z[0] = codebook[10] + 0.5
    idx, z_q, err = vq_search_triton(z, codebook, splits=splits)
    assert idx[0].item() == 10
    assert_nearest(idx, z, codebook)
    assert torch.equal(z_q, codebook[idx])
    torch.testing.assert_close(err, (z - codebook[idx]).square().sum(1))


@pytest.mark.parametrize("splits", [1, 3])
def test_tf32_rescore_path_keeps_exact_argmin(device, splits):
    """Rows whose top-2 gap is within tf32's bound are searched again in ieee fp32.

    Under the interpreter the dot is exact, so this checks the bookkeeping (which rows, the
    merge with split-K, z_q/err of rescored rows); the GPU test measures the exactness gain.
    """
    if not fastvq.triton_available():
        pytest.skip("Triton is not importable here")
    from fastvq import _search_triton as vq_search

    z = torch.randn(50, 32, device=device)
    codebook = torch.randn(600, 32, device=device)
    codebook[500] = z[3] + 1e-3  # a near tie for row 3: codes 20 and 500 (different splits)
    codebook[20] = z[3] - 1e-3
    codebook[21] = z[4] + 2e-4
    before = vq_search.RESCORE_STATS["rows"]
    idx, z_q, err = vq_search.vq_search_triton(
        z, codebook, fp32_precision="tf32_rescore", splits=splits
    )
    assert vq_search.RESCORE_STATS["rows"] - before >= 1
    assert_nearest(idx, z, codebook)
    ref_idx, _, _ = vq_search.vq_search_triton(z, codebook, fp32_precision="ieee")
    assert torch.equal(idx, ref_idx)
    assert torch.equal(z_q, codebook[idx])
    torch.testing.assert_close(err, (z - codebook[idx]).square().sum(1))


def test_torch_backend_tiles_carry_the_running_min(device, poison):
    """Many row and code blocks (odd sizes), with duplicate codes straddling code blocks."""
    z = torch.randn(100, 12, device=device)
    codebook = torch.randint(-3, 3, (301, 12), device=device).float()
    codebook[290] = codebook[12]  # an exact tie in a later code block: the lower index must win
    z[0] = codebook[12] + 0.5
    idx, z_q, err = _search_torch.search_torch(z, codebook, block_n=7, block_k=13)
    assert idx[0].item() == 12
    assert_nearest(idx, z, codebook)
    assert torch.equal(z_q, codebook[idx])
    torch.testing.assert_close(err, (z - codebook[idx]).square().sum(1))


def test_code_norms_in_chunks():
    """Both backends' fp32 code norms, chunked over rows; non-finite codes get +inf."""
    c = torch.randn(1000, 37).to(torch.bfloat16)
    c[5, 3] = float("nan")
    c[999, 0] = float("inf")
    # 2 rows per chunk: many chunks and a ragged tail
    norms = _search_torch.code_norms(c, chunk_elems=100)
    ref = c.float().square().sum(1)
    ref[5] = ref[999] = float("inf")
    assert norms.dtype == torch.float32
    assert torch.equal(norms, ref)
