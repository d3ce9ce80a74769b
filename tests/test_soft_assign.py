"""``fastvq.soft_assign`` on both backends (Triton interpreted on CPU) against the literal fp64
N x K formula on the same rounded inputs: values, argmax, gradients of every output, masks,
non-finite rows, ragged tiles, bad input, an empty batch, and nothing N x K saved or held."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import soft_assign

pytestmark = pytest.mark.usefixtures("one_thread")

SIMS = ("dot", "neg_l2", "neg_dist")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}  # fmt: skip
# fp32 arithmetic on the rounded inputs: relative error of a few 1e-7 per logit, times the
# logits' scale; gradients add a few more roundings. fp64 (torch backend only) is near-exact.
RTOL = {torch.float64: 1e-10}
# argmax near-ties: an index is right when its fp64 logit is within this many fp32 ulps of the
# logit scale of the best one; where the fp64 top-2 gap exceeds it, the index must be the best.
ARGMAX_TIE_RTOL = 1e-5


def _literal(z, c, temperature, sim, eps=1e-4):
    """The formula with an N x K matrix, in fp64: logits, lse, p, E_p[x], p @ C."""
    z, c = z.double(), c.double()
    if sim == "dot":
        s = z @ c.T
    else:
        d2 = (z[:, None, :] - c[None, :, :]).square().sum(-1)
        s = -d2 if sim == "neg_l2" else -d2.clamp(min=eps * eps).sqrt()
    x = s / temperature
    p = x.softmax(1)
    return x, x.logsumexp(1), p, (p * x).sum(1), p @ c


def _inputs(n, d, k, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g) * scale).to(dtype)
    c = (torch.randn(k, d, generator=g) * scale).to(dtype)
    return z, c


def _tol(dtype, scale):
    rtol = RTOL.get(dtype, 2e-5)
    return dict(rtol=rtol, atol=rtol * scale)


def _check_argmax(idx, x):
    best = x.max(1)
    scale = 1.0 + x.abs().max(1).values
    tol = ARGMAX_TIE_RTOL * scale
    picked = x.gather(1, idx[:, None])[:, 0]
    assert (picked >= best.values - tol).all(), "an argmax is not within the tie tolerance"
    if x.shape[1] > 1:
        top2 = x.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > tol
        assert torch.equal(idx[clear], best.indices[clear])


def _skip_fp64_triton(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend takes no fp64 (TypeError tested below)")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("sim", SIMS)
@pytest.mark.parametrize(
    "n,d,k", [(1, 3, 1), (63, 3, 1000), (63, 257, 17), (1, 257, 1000)],
    ids=lambda v: str(v),
)  # fmt: skip
def test_matches_literal(backend, dtype, sim, n, d, k):
    _skip_fp64_triton(backend, dtype)
    z, c = _inputs(n, d, k, dtype, seed=n + d + k)
    temperature = 0.7 if sim == "dot" else 3.0 * d
    out = soft_assign(z, c, temperature=temperature, similarity=sim, backend=backend)
    x, lse, p, e, q = _literal(z, c, temperature, sim)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.lse.dtype == out.expected_code.dtype == out.column_sums.dtype == work
    assert out.index.dtype == torch.int64
    scale = float(x.abs().max())
    tol = _tol(dtype, scale)
    torch.testing.assert_close(out.lse.double(), lse, **tol)
    torch.testing.assert_close(out.expected_logit.double(), e, **tol)
    torch.testing.assert_close(out.entropy.double(), lse - e, **tol)
    cscale = float(c.double().abs().max())
    torch.testing.assert_close(out.expected_code.double(), q, **_tol(dtype, cscale * scale))
    torch.testing.assert_close(out.column_sums.double(), p.sum(0), **_tol(dtype, n * scale))
    _check_argmax(out.index, x)


@pytest.mark.parametrize("sim", SIMS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_of_every_output_match_literal_autograd(backend, sim, masked):
    """Random upstream weights on lse, E_p[x], p @ C and the column sums: z's and C's gradients
    against fp64 autograd through the literal formula (fp64 in, for the torch backend)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    n, d, k = 45, 7, 70
    z, c = _inputs(n, d, k, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(n, generator=g) > 0.3 if masked else None
    w = torch.ones(n, dtype=torch.float64) if mask is None else mask.double()
    ups = [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, d, generator=g),
           torch.randn(k, generator=g), torch.randn(n, generator=g)]  # fmt: skip
    ups = [u.double() for u in ups]
    temperature = 1.3

    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = soft_assign(z1, c1, temperature=temperature, similarity=sim, mask=mask,
                      backend=backend, chunk=16)  # fmt: skip
    outs = (out.lse, out.expected_logit, out.expected_code, out.column_sums, out.entropy)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, ups, strict=True))
    gz, gc = torch.autograd.grad(loss, (z1, c1))

    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    _, lse, p, e, q = _literal(z2, c2, temperature, sim)
    refs = (lse * w, e * w, q * w[:, None], (p * w[:, None]).sum(0), (lse - e) * w)
    ref_loss = sum((o * u).sum() for o, u in zip(refs, ups, strict=True))
    rz, rc = torch.autograd.grad(ref_loss, (z2, c2))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gz.double(), rz, **tol)
    torch.testing.assert_close(gc.double(), rc, **tol)
    if mask is not None:
        assert (gz[~mask] == 0).all()


@pytest.mark.parametrize(
    "which", ["lse", "expected_logit", "expected_code", "column_sums", "entropy"]
)
def test_each_output_alone_has_its_gradient(backend, which):
    """Only one output used: the others' gradients arrive as None, and the column-sum pass of
    the backward is skipped unless the column sums are used."""
    z, c = _inputs(20, 5, 33, torch.float32, seed=5)
    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = soft_assign(z1, c1, backend=backend)
    getattr(out, which).square().sum().backward()
    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    _, lse, p, e, q = _literal(z2, c2, 1.0, "dot")
    literal = {"lse": lse, "expected_logit": e, "expected_code": q, "column_sums": p.sum(0),
               "entropy": lse - e}  # fmt: skip
    literal[which].square().sum().backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c1.grad.double(), c2.grad, rtol=1e-4, atol=1e-4)


def test_entropy_keeps_its_digits_when_p_is_one_hot(backend):
    """At temperature 0.01 the rows are one-hot to fp32 and lse, E_p[x] are both the row max
    (~1e3) plus a few ulp: their difference loses its digits, the entropy output (accumulated
    relative to the max) and its gradient do not. Measured before the entropy output: the
    gradient of lse - E_p[x] was 1.2e-2 (torch) / 1.3e-2 (Triton) off fp64 relative to its
    largest entry, where the literal formula in fp32 is 1.2e-4 off."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(48, 16, generator=g) * 0.5 + torch.randn(16, generator=g) * 0.7
    c = torch.randn(300, 16, generator=g)
    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = soft_assign(z1, c1, temperature=0.01, backend=backend, chunk=64)
    up = torch.randn(48, generator=g)
    gz, gc = torch.autograd.grad((out.entropy * up).sum(), (z1, c1))
    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    x = z2 @ c2.T / 0.01
    ent = -(x.softmax(1) * x.log_softmax(1)).sum(1)
    rz, rc = torch.autograd.grad((ent * up.double()).sum(), (z2, c2))
    torch.testing.assert_close(out.entropy.double(), ent.detach(), rtol=1e-3, atol=1e-3)
    for got, want in ((gz, rz), (gc, rc)):
        atol = 1e-3 * float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=atol)


def test_ragged_tiles_and_many_row_tiles_torch():
    """Small forced chunks (the last one ragged) and more rows than one row tile."""
    z, c = _inputs(600, 6, 50, torch.float64, seed=6)
    for chunk in (1, 7, 50, 10_000):
        out = soft_assign(z, c, similarity="neg_l2", backend="torch", chunk=chunk)
        x, lse, p, e, q = _literal(z, c, 1.0, "neg_l2")
        torch.testing.assert_close(out.lse, lse)
        torch.testing.assert_close(out.expected_code, q)
        torch.testing.assert_close(out.column_sums, p.sum(0))
        assert torch.equal(out.index, x.argmax(1))


def test_ties_go_to_the_lowest_index_across_tiles(backend):
    """Duplicate codes in different tiles (Triton's 64-code tiles, torch chunks of 16): the
    lowest index wins, as the equal codes give bitwise-equal logits."""
    z, c = _inputs(30, 16, 150, torch.float32, seed=7)
    c[70] = c[3]
    c[140] = c[3]
    z[:10] = 5 * c[3]
    out = soft_assign(z, c, backend=backend, chunk=16)
    assert (out.index[:10] == 3).all()


def test_mask_rows_output_zero_and_weigh_nothing(backend):
    z, c = _inputs(40, 5, 30, torch.float32, seed=8)
    mask = torch.arange(40) % 3 != 0
    z[0] = float("nan")  # padding under the mask reaches nothing
    out = soft_assign(z, c, mask=mask, backend=backend)
    ref = soft_assign(z[mask], c, backend=backend)
    for name in ("lse", "expected_logit", "expected_code"):
        got = getattr(out, name)
        assert (got[~mask] == 0).all()
        torch.testing.assert_close(got[mask], getattr(ref, name))
    assert (out.index[~mask] == 0).all()
    torch.testing.assert_close(out.column_sums, ref.column_sums)


def test_non_finite_rows(backend):
    """A counted row with NaN/Inf: NaN lse, E_p[x], p @ C; index 0; every column sum NaN; no
    gradient from it. Other rows are untouched. A non-finite code makes every row non-finite."""
    z, c = _inputs(10, 4, 20, torch.float32, seed=9)
    z[2, 1] = float("nan")
    z[5, 0] = float("inf")
    bad = torch.zeros(10, dtype=torch.bool)
    bad[[2, 5]] = True
    z1 = z.clone().requires_grad_()
    out = soft_assign(z1, c, backend=backend)
    assert out.lse[bad].isnan().all() and out.expected_logit[bad].isnan().all()
    assert out.expected_code[bad].isnan().all()
    assert (out.index[bad] == 0).all()
    assert out.column_sums.isnan().all()
    good = soft_assign(z[~bad], c, backend=backend)
    torch.testing.assert_close(out.lse[~bad], good.lse)
    assert torch.equal(out.index[~bad], good.index)
    out.lse[~bad].sum().backward()
    assert z1.grad.isfinite().all() and (z1.grad[bad] == 0).all()
    c_bad = c.clone()
    c_bad[4, 2] = float("nan")
    out = soft_assign(z[~bad], c_bad, backend=backend)
    assert out.lse.isnan().all() and (out.index == 0).all()


def test_empty_batch(backend):
    z = torch.zeros(0, 5, requires_grad=True)
    c = torch.randn(9, 5, requires_grad=True)
    out = soft_assign(z, c, backend=backend)
    assert out.lse.shape == (0,) and out.expected_code.shape == (0, 5)
    assert torch.equal(out.column_sums, torch.zeros(9))
    (out.lse.sum() + out.column_sums.sum()).backward()
    assert torch.equal(c.grad, torch.zeros_like(c))


def test_poisoned_outputs_are_all_written(monkeypatch):
    from fastvq import _soft_assign_triton as launcher

    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)
    z, c = _inputs(70, 5, 130, torch.float32, seed=10)
    out = soft_assign(z, c, backend="triton")
    ref = soft_assign(z, c, backend="torch")
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_column_sums_can_be_skipped(backend):
    z, c = _inputs(8, 3, 5, torch.float32)
    out = soft_assign(z, c, backend=backend, column_sums=False)
    assert out.column_sums is None
    torch.testing.assert_close(out.lse, soft_assign(z, c, backend=backend).lse)


def test_nothing_n_by_k_is_saved_for_backward():
    n, d, k = 300, 4, 400
    z = torch.randn(n, d, requires_grad=True)
    c = torch.randn(k, d, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = soft_assign(z, c, backend="torch")
    assert max(sizes) < n * k / 10, sizes
    out.column_sums.sum().backward()


BAD = [
    (dict(z=[[1.0]]), TypeError, "z must be a torch.Tensor"),
    (dict(z=torch.ones(2, 3, dtype=torch.int64)), TypeError, "z must be float"),
    (dict(z=torch.ones(3)), ValueError, r"z must have shape \(N, D\)"),
    (dict(C=torch.ones(0, 3)), ValueError, "C must have shape"),
    (dict(C=torch.ones(4, 2)), ValueError, "z's D"),
    (dict(C=torch.ones(4, 3, dtype=torch.float64)), TypeError, "both be fp64"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(similarity="cos"), ValueError, "similarity"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(chunk=0), ValueError, "chunk"),
    (dict(chunk=True), ValueError, "chunk"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.ones(2)), TypeError, "mask must be a bool"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(z=torch.ones(2, 3), C=torch.ones(4, 3))
    args.update(kwargs)
    z, c = args.pop("z"), args.pop("C")
    with pytest.raises(exc, match=match):
        soft_assign(z, c, **args)


def test_triton_backend_refuses_fp64():
    with pytest.raises(TypeError, match="float64"):
        soft_assign(torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64),
                    backend="triton")  # fmt: skip


def test_exported():
    assert fastvq.soft_assign is soft_assign and "soft_assign" in fastvq.__all__


def test_memory_stays_flat():
    """N = 2048, K = 2^15, D = 64, torch backend, forward + backward of every output: peak RSS
    growth under 128 MiB, half of one N x K fp32 matrix (54 MiB measured on the 2-core shared
    machine, 2026-12-07). The N = 16384, K = 2^18 figure: benchmarks/soft_assign_memory.py."""
    cmd = [sys.executable, "-m", "benchmarks.soft_assign_memory", "2048", "32768", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.split("growth=")[1].split()[0])
    assert growth < 128, out.stdout


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("d", [64, 32, 33, 100, 256])
def test_gpu_tiles_are_exact_under_the_interpreter(monkeypatch, arch, d):
    """The tiles a GPU launches (benchmarks/gpu_static.py gates them: held D = 32, 64; the D loop
    at 33, 100, 256), run by the interpreter: two row blocks and several code tiles, ragged,
    every output's gradient."""
    from fastvq import _soft_assign_triton as launcher

    monkeypatch.setattr(launcher, "_arch", lambda device: arch)
    z, c = _inputs(70, d, 75, torch.float32, seed=d)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
        out = soft_assign(z1, c1, similarity="neg_dist", temperature=2.0, backend=backend)
        (out.lse.sum() + out.expected_logit.sum() + out.expected_code.square().sum()
         + out.column_sums.square().sum()).backward()  # fmt: skip
        outs.append(out)
        grads.append((z1.grad, c1.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_value_grad_false_is_the_gradient_of_p_times_detached_codes(backend):
    z, c = _inputs(30, 5, 40, torch.float32, seed=11)
    g = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = soft_assign(z1, c1, backend=backend, value_grad=False, temperature=0.5)
    (out.expected_code * g).sum().backward()
    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    p = (z2 @ c2.T / 0.5).softmax(1)
    ((p @ c2.detach()) * g.double()).sum().backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c1.grad.double(), c2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sim", SIMS)
def test_forced_d_loop_with_ragged_chunks(monkeypatch, sim):
    """The D loop under the interpreter with small tiles: D = 37 in output chunks of 16 (the
    last 5 wide) and dot chunks of 16; ragged row and code tiles, a mask, every output and its
    gradient against fp64 autograd through the literal formula."""
    from fastvq import _soft_assign_triton as launcher

    def forced(kernel, n, k, d, *, arch=None):
        return launcher.SoftAssignConfig(16, 16, 16, 4, 1, 16)

    monkeypatch.setattr(launcher, "pick_config", forced)
    n, d, k = 37, 37, 45
    z, c = _inputs(n, d, k, torch.float32, seed=12)
    g = torch.Generator().manual_seed(13)
    mask = torch.rand(n, generator=g) > 0.2
    w = mask.double()
    shapes = ((n,), (n,), (n, d), (k,), (n,))
    ups = [torch.randn(*shape, generator=g).double() for shape in shapes]
    temperature = 0.8 if sim == "dot" else 2.0 * d
    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = soft_assign(z1, c1, temperature=temperature, similarity=sim, mask=mask,
                      backend="triton")  # fmt: skip
    outs = (out.lse, out.expected_logit, out.expected_code, out.column_sums, out.entropy)
    sum((o.double() * u).sum() for o, u in zip(outs, ups, strict=True)).backward()

    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    x, lse, p, e, q = _literal(z2, c2, temperature, sim)
    refs = (lse * w, e * w, q * w[:, None], (p * w[:, None]).sum(0), (lse - e) * w)
    for got, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    _check_argmax(out.index[mask], x.detach()[mask])
    sum((o * u).sum() for o, u in zip(refs, ups, strict=True)).backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c1.grad.double(), c2.grad, rtol=1e-4, atol=1e-4)


def test_forced_d_loop_codes_only_without_value_grad(monkeypatch):
    """The D loop's other flags: only C requires grad (no dz pass) and ``value_grad=False``,
    against the torch backend."""
    from fastvq import _soft_assign_triton as launcher

    z, c = _inputs(21, 37, 40, torch.float32, seed=14)
    g = torch.randn(21, 37, generator=torch.Generator().manual_seed(15))
    grads = []
    for backend in ("triton", "torch"):
        c1 = c.clone().requires_grad_()
        with monkeypatch.context() as m:
            m.setattr(launcher, "pick_config",
                      lambda *a, **kw: launcher.SoftAssignConfig(16, 16, 32, 4, 1, 16))  # fmt: skip
            out = soft_assign(z, c1, similarity="neg_l2", temperature=50.0, value_grad=False,
                              backend=backend)  # fmt: skip
            ((out.expected_code * g).sum() + out.column_sums.square().sum()).backward()
        grads.append(c1.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
