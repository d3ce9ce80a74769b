"""GPU-only checks of the compiled kernels (the interpreter must be off). Skipped without CUDA.

Run by benchmarks/gpu_check.sh on a lent GPU. When FASTVQ_RESULTS_DIR is set, the measured
argmin mismatch rates are also written there as JSON.
"""

import json
import os

import pytest
import torch

import fastvq

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RATES = {}


def _record(key, value):
    RATES[key] = value
    out = os.environ.get("FASTVQ_RESULTS_DIR")
    if out:
        with open(os.path.join(out, "cuda_exactness.json"), "w") as f:
            json.dump(RATES, f, indent=1)


def test_interpreter_is_off():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    from fastvq.ops import interpreting

    assert not interpreting()


def _oracle_top2(z, codebook, chunk=2048):
    """fp64 best two distances and argmin per row, in row chunks (never N x K at once)."""
    c64 = codebook.double()
    cn = c64.square().sum(1)
    vals, args = [], []
    for i in range(0, z.shape[0], chunk):
        z64 = z[i : i + chunk].double()
        dist = z64.square().sum(1, keepdim=True) + cn[None] - 2 * z64 @ c64.T
        v, a = dist.topk(2, dim=1, largest=False)
        vals.append(v)
        args.append(a[:, 0])
    return torch.cat(vals), torch.cat(args)


# The sm_90 Gluon search first: it is the default there and has not yet run on a GPU, so if
# gpu_check.sh's time for this stage runs out, the tests it cuts are the long-verified ones.
sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the Gluon search kernel is for sm_90",
)


@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "n, k, d",
    [(8192, 16384, 64), (8192, 16384, 256), (333, 1000, 40), (1, 65, 8), (5000, 300, 128),
     (300, 856, 64), (300, 856, 256)],
)  # fmt: skip
def test_gluon_kernel_matches_triton_and_fp64(monkeypatch, n, k, d, dtype):
    """kernels/vq_search_sm90.py against the Triton kernel and the fp64 oracle: odd N, a partial
    last tile, D below the tile, split-K (small N), 7 tiles (a round of stages, then a pair and
    an odd tile at the next barrier phase), z_q and the squared error."""
    from fastvq._search_triton import plan_search, vq_search_triton

    torch.manual_seed(0)
    z = torch.randn(n, d, device="cuda").to(dtype)
    codebook = torch.randn(k, d, device="cuda").to(dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert plan_search(n, k, d, dtype, dtype, arch=90, num_sms=sms, kernel="gluon").gluon
    ref = vq_search_triton(z, codebook, kernel="triton")
    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "gluon")
    idx, z_q, err = vq_search_triton(z, codebook)
    top2, oracle = _oracle_top2(z, codebook)
    z64, c64 = z.double(), codebook.double()
    tau = 8 * (d**0.5 + 2) * torch.finfo(torch.float32).eps
    clear = (top2[:, 1] - top2[:, 0]) > tau * (z64.square().sum(1) + c64.square().sum(1).max())
    assert not ((idx != oracle) & clear).any()
    # both kernels accumulate in fp32 on tensor cores: they may differ on near-ties only
    assert not ((idx != ref[0]) & clear).any()
    assert torch.equal(z_q, codebook[idx])
    torch.testing.assert_close(err, (z.float() - codebook[idx].float()).square().sum(1))
    _record(f"gluon-{n}x{k}x{d}-{str(dtype).split('.')[-1]}", {
        "differs_from_triton": int((idx != ref[0]).sum()), "near_tie_rows": int((~clear).sum()),
    })  # fmt: skip


@sm90
def test_gluon_kernel_non_finite_rows(monkeypatch):
    """NaN and Inf rows get index 0 like the Triton kernel and the torch backend."""
    from fastvq._search_triton import vq_search_triton

    z = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    z[3] = float("nan")
    z[7, 5] = float("inf")
    codebook = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)
    ref = vq_search_triton(z, codebook, kernel="triton")
    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "gluon")
    got = vq_search_triton(z, codebook)
    assert got[0][3] == 0 and got[0][7] == ref[0][7] == 0
    finite = torch.ones(300, dtype=torch.bool, device="cuda")
    finite[[3, 7]] = False
    assert (got[0][finite] == ref[0][finite]).float().mean().item() > 0.99


@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 256])
def test_gluon_kernel_passes_its_first_use_check(dtype, d):
    """The default ("auto") runs the Gluon kernel on sm_90 only after this check passes."""
    from fastvq import _search_triton as vs

    vs._GLUON_CHECKED.clear()
    assert vs.gluon_checked(torch.device("cuda", torch.cuda.current_device()), dtype, d)


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize(
    "dtype, precision",
    [
        (torch.float32, "ieee"),
        (torch.float32, "tf32x3"),
        (torch.float32, "tf32"),
        (torch.float32, "tf32_rescore"),
        (torch.bfloat16, None),
        (torch.float16, None),
    ],
    ids=["fp32-ieee", "fp32-tf32x3", "fp32-tf32", "fp32-tf32rescore", "bf16", "fp16"],
)
def test_argmin_exactness_vs_fp64(d, dtype, precision):
    from fastvq._search_triton import RESCORE_STATS, vq_search_triton

    torch.manual_seed(0)
    n, k = 8192, 16384
    rescored_before = RESCORE_STATS["rows"]
    z = torch.randn(n, d, device="cuda").to(dtype)
    codebook = torch.randn(k, d, device="cuda").to(dtype)
    idx, z_q, err = vq_search_triton(z, codebook, fp32_precision=precision)
    top2, ref = _oracle_top2(z, codebook)
    z64, c64 = z.double(), codebook.double()
    tau = 8 * (d**0.5 + 2) * torch.finfo(torch.float32).eps
    tau = tau * (z64.square().sum(1) + c64.square().sum(1).max())
    clear = (top2[:, 1] - top2[:, 0]) > tau
    mism = (idx != ref) & clear
    rate = mism.float().mean().item()
    _record(f"D{d}-{str(dtype).split('.')[-1]}-{precision}", {
        "mismatch_rate_outside_near_ties": rate,
        "any_mismatch_rate": (idx != ref).float().mean().item(),
        "near_tie_rows": int((~clear).sum()),
        "rescored_rows": RESCORE_STATS["rows"] - rescored_before,
        "rows": n,
    })  # fmt: skip
    assert torch.equal(z_q, codebook[idx])
    if precision == "tf32":
        # tf32 rounds inputs to 10 mantissa bits: misranks are expected; the rate is recorded.
        return
    assert rate == 0.0, f"{int(mism.sum())} rows picked another code outside near-ties"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_torch_backend(dtype):
    torch.manual_seed(0)
    z = torch.randn(4096, 128, device="cuda").to(dtype)
    codebook = torch.randn(2048, 128, device="cuda").to(dtype)
    outs = {}
    for be in ("triton", "torch"):
        zz = z.clone().requires_grad_(True)
        cc = codebook.clone().requires_grad_(True)
        q, idx, loss = fastvq.vector_quantize(zz, cc, backend=be)
        (q.float().square().sum() + 100 * loss).backward()
        outs[be] = (idx, zz.grad, cc.grad, loss)
    same = (outs["triton"][0] == outs["torch"][0]).float().mean().item()
    assert same > 0.999
    if same == 1.0:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for a, b in zip(outs["triton"][1:], outs["torch"][1:], strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_on_gpu(deterministic):
    idx = torch.randint(0, 1000, (100_000,), device="cuda")
    idx[:20_000] = 7  # one hot code
    rows = torch.randn(100_000, 96, device="cuda")
    out = fastvq.scatter_rows(idx, rows, 1000, backend="triton", deterministic=deterministic)
    ref = torch.zeros(1000, 96, device="cuda", dtype=torch.float64).index_add_(
        0, idx, rows.double()
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)
    if deterministic:
        again = fastvq.scatter_rows(idx, rows, 1000, backend="triton", deterministic=True)
        assert torch.equal(out, again)


def test_large_codebook_memory_is_linear():
    """K = 262144, N = 65536, D = 256 (bf16): naive N x K fp32 distances alone need 64 GiB."""
    torch.cuda.empty_cache()
    z = torch.randn(65536, 256, device="cuda", dtype=torch.bfloat16)
    codebook = torch.randn(262144, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q, idx, loss = fastvq.vector_quantize(z, codebook, backend="triton")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # outputs (N x D bf16 + N int64) plus the fp32 codebook copy for norms: O(N.D + K.D)
    bound = 4 * (65536 * 256 * 2 + 262144 * 256 * 4)
    _record("K262144-peak_bytes", peak)
    assert peak < bound, f"peak {peak / 2**30:.2f} GiB"
    assert idx.min() >= 0 and idx.max() < 262144


def test_offsets_beyond_int32():
    """N * D > 2^31 elements: offsets must be computed in int64."""
    n, d = (1 << 23) + 3, 256
    try:
        z = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    codebook = torch.randn(64, d, device="cuda", dtype=torch.bfloat16)
    q, idx, loss = fastvq.vector_quantize(z, codebook, backend="triton")
    tail = slice(n - 1000, n)
    ref_idx, _, _ = fastvq.search(z[tail], codebook, backend="torch")
    assert (idx[tail] == ref_idx).float().mean().item() > 0.999
    assert torch.equal(q[tail], codebook[idx[tail]])


def test_autotuned_kernel_matches_default(monkeypatch):
    from fastvq._search_triton import vq_search_triton

    z = torch.randn(5000, 256, device="cuda", dtype=torch.bfloat16)
    codebook = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16)
    ref = vq_search_triton(z, codebook)
    monkeypatch.setenv("FASTVQ_AUTOTUNE", "1")
    got = vq_search_triton(z, codebook)
    assert (got[0] == ref[0]).float().mean().item() > 0.999
