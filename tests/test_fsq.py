"""fastvq.FSQ against an independent oracle: the paper's formula in fp64, element by element,
and the implicit codebook enumerated with itertools (no basis arithmetic)."""

import itertools
import math

import pytest
import torch

import fastvq
from fastvq import FSQ

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEVELS = [[8, 5, 5, 5], [7, 6, 3], [8, 8, 8, 5, 5, 5], [4]]


def oracle(z: torch.Tensor, levels, *, symmetric=False, margin=1e-3):
    """The paper's bound and rounding in fp64 (Mentzer et al. 2023, appendix A.1, with atanh;
    symmetric: Parker et al. 2024, sec. 3.2). Returns ``(codes fp64 (..., d), continuous fp64,
    tie (...,) bool: some element within 1e-4 of a rounding boundary)``."""
    z = z.to(torch.float64)
    codes, cont, tie = [], [], torch.zeros(z.shape[:-1], dtype=torch.bool)
    for i, L in enumerate(levels):
        zi = z[..., i]
        if symmetric:
            br = (L - 1) * (torch.tanh(zi) + 1) / 2 + 0.5
            codes.append(2 / (L - 1) * br.floor() - 1)
            cont.append(2 / (L - 1) * br - 1)
            tie |= (br - br.round()).abs() < 1e-4
        else:
            half_l = (L - 1) * (1 - margin) / 2
            offset = 0.5 if L % 2 == 0 else 0.0
            b = torch.tanh(zi + math.atanh(offset / half_l)) * half_l - offset
            codes.append(b.round() / (L // 2))
            cont.append(b / (L // 2))
            tie |= ((b - b.floor()) - 0.5).abs() < 1e-4
    return torch.stack(codes, -1), torch.stack(cont, -1), tie


def grid(levels, *, symmetric=False):
    """Every code, in index order (the first channel least significant), by enumeration."""
    vals = []
    for L in levels:
        if symmetric:
            vals.append([2 * k / (L - 1) - 1 for k in range(L)])
        else:
            vals.append([(k - L // 2) / (L // 2) for k in range(L)])
    rows = [
        tuple(reversed(t))
        for t in itertools.product(*[vals[i] for i in reversed(range(len(levels)))])
    ]
    return torch.tensor(rows, dtype=torch.float64)


def oracle_index(codes: torch.Tensor, levels, *, symmetric=False) -> torch.Tensor:
    g = grid(levels, symmetric=symmetric)
    flat = codes.reshape(-1, codes.shape[-1])
    d = torch.cdist(flat, g)
    return d.argmin(-1).reshape(codes.shape[:-1])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("levels", LEVELS, ids=lambda lv: "L" + "-".join(map(str, lv)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fsq_matches_the_oracle(levels, symmetric, dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 37, len(levels)) * 2).to(dtype)
    q, idx, loss = FSQ(levels, preserve_symmetry=symmetric)(x)
    codes, _, tie = oracle(x.float(), levels, symmetric=symmetric)
    ok = ~tie
    assert q.dtype == dtype and idx.dtype == torch.int64 and idx.shape == (3, 37)
    # the grid value computed in fp32 (as vqp), then cast: within one rounding of the exact one
    tol = {torch.float32: 3e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(q[ok].double(), codes[ok], rtol=0, atol=tol)
    assert torch.equal(idx[ok], oracle_index(codes, levels, symmetric=symmetric)[ok])
    assert loss.dtype == torch.float32 and loss.ndim == 0 and float(loss) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indices_exact_beyond_the_dtype(dtype):
    """64000 codes: bf16 holds integers exactly only up to 256, fp16 up to 2048."""
    levels = [8, 8, 8, 5, 5, 5]
    grid_codes = grid(levels)
    k = torch.arange(0, 64000, 37)
    x = (grid_codes[k] * 3).to(dtype)  # tanh-bounded inputs land on each chosen code
    f = FSQ(levels)
    q, idx, _ = f(x)
    assert idx.max() > 2048
    codes, _, tie = oracle(x.float(), levels)
    want = oracle_index(codes, levels)
    assert not tie.any() and torch.equal(idx, want)
    assert torch.equal(f.codes_from_indices(idx, dtype=dtype), q)
    assert torch.equal(
        f.codes_from_indices(torch.arange(64000)).double(), grid_codes.float().double()
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_is_the_bounds(symmetric):
    """Straight-through: the gradient is plain autograd's of the continuous bound (fp64)."""
    levels = [8, 5, 3]
    torch.manual_seed(1)
    x = torch.randn(5, 11, 3, requires_grad=True)
    g = torch.randn(5, 11, 3)
    (grad,) = torch.autograd.grad(
        (FSQ(levels, preserve_symmetry=symmetric)(x).quantized * g).sum(), x
    )
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(
        (oracle(x64, levels, symmetric=symmetric)[1] * g.double()).sum(), x64
    )
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


def test_mask_rows_give_codes_no_gradient_no_counts():
    torch.manual_seed(2)
    f = FSQ([5, 5, 4])
    x = torch.randn(4, 9, 3)
    mask = torch.rand(4, 9) > 0.4
    x[~mask] = x[~mask].clone()
    x_nan = x.clone()
    x_nan[0, ~mask[0]] = float("nan")
    for inp in (x, x_nan):
        inp = inp.clone().requires_grad_()
        q, idx, loss, stats = f(inp, mask=mask, return_stats=True)
        (grad,) = torch.autograd.grad((q * torch.randn_like(q)).sum() + loss, inp)
        assert torch.isfinite(q).all() and (grad[~mask] == 0).all() and (grad[mask] != 0).any()
        assert float(stats.counts.sum()) == float(mask.sum()) and float(loss) == 0.0
    proj = FSQ([5, 5, 4], dim=6)
    xp = torch.randn(4, 9, 6)
    xp[~mask] = float("nan")
    qp, _, _ = proj(xp, mask=mask)
    qp.square().sum().backward()
    assert torch.isfinite(qp).all() and all(torch.isfinite(p.grad).all() for p in proj.parameters())
    q_all, idx_all, _ = f(x)
    q_m, idx_m, _ = f(x, mask=mask)
    assert torch.equal(q_all, q_m) and torch.equal(idx_all, idx_m)  # masked rows: their code


@pytest.mark.parametrize("dim", [3, 16])
def test_channel_first_and_projection(dim):
    torch.manual_seed(3)
    a = FSQ([7, 5, 5], dim=dim)
    b = FSQ([7, 5, 5], dim=dim, channel_first=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, dim, 4, 5)
    qa, ia, _ = a(x.movedim(1, -1))
    qb, ib, _ = b(x)
    assert torch.equal(qb, qa.movedim(-1, 1)) and torch.equal(ib, ia) and ib.shape == (2, 4, 5)
    a.eval()
    assert torch.equal(a.codes_from_indices(ia), qa)
    assert torch.equal(b.codes_from_indices(ib), qb)
    assert set(a.state_dict()) == (
        set()
        if dim == 3
        else {f"project_{s}.{p}" for s in ("in", "out") for p in ("weight", "bias")}
    )


def test_num_codebooks_is_independent_groups():
    torch.manual_seed(4)
    f = FSQ([8, 5, 5], num_codebooks=2)
    one = FSQ([8, 5, 5])
    x = torch.randn(6, 7, 6)
    q, idx, _ = f(x)
    assert f.dim == 6 and idx.shape == (6, 7, 2)
    for c in range(2):
        qc, ic, _ = one(x[..., 3 * c : 3 * c + 3])
        assert torch.equal(q[..., 3 * c : 3 * c + 3], qc) and torch.equal(idx[..., c], ic)
    assert torch.equal(f.codes_from_indices(idx), q)
    with pytest.raises(ValueError, match="num_codebooks"):
        f.codes_from_indices(idx[..., 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_with_projection_and_autocast(dtype):
    torch.manual_seed(5)
    f = FSQ([8, 8, 8, 5, 5, 5], dim=24).eval()
    x = torch.randn(3, 10, 24)
    q, idx, _ = f(x.to(dtype))  # runs the projection in fp32, output in x's dtype
    q32, idx32, _ = f(x.to(dtype).float())
    assert q.dtype == dtype and torch.equal(idx, idx32) and torch.equal(q, q32.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qa, ia, _ = f(x)
        assert torch.equal(f.codes_from_indices(ia), qa)
    assert qa.dtype == torch.bfloat16 and ia.max() < 64000


def test_empty_batch():
    f = FSQ([5, 5], dim=8)
    x = torch.randn(0, 8, requires_grad=True)
    q, idx, loss, stats = f(x, return_stats=True)
    assert q.shape == (0, 8) and idx.shape == (0,) and float(loss) == 0
    assert stats.counts.shape == (1, 25) and float(stats.counts.sum()) == 0
    q.sum().backward()
    assert f.codes_from_indices(idx).shape == (0, 8)


def test_stats_and_usage():
    torch.manual_seed(6)
    f = FSQ([3, 3])
    x = torch.randn(500, 2) * 3
    q, idx, _, stats = f(x, return_stats=True)
    assert torch.equal(stats.counts[0], torch.bincount(idx, minlength=9).float())
    assert float(stats.used_fraction) == 1.0 and 1 < float(stats.perplexity) <= 9
    meter = fastvq.UsageMeter(f.codebook_size)
    meter.update(idx)
    assert meter.used_fraction == 1.0
    assert f.get_codebook().shape == (9, 2) and torch.equal(f.get_indices(x), idx)


def test_noise_dropout():
    torch.manual_seed(7)
    f = FSQ([5, 5, 5], preserve_symmetry=True, noise_dropout=0.5)
    x = torch.randn(200, 3)
    q, idx, _ = f.eval()(x)
    f.train()
    torch.manual_seed(8)
    qn, idxn, _ = f(x)
    torch.manual_seed(8)
    qn2, _, _ = f(x)
    noisy = qn != q
    assert torch.equal(idxn, idx) and torch.equal(qn, qn2)
    assert 0.35 < noisy.float().mean() < 0.65
    _, cont, _ = oracle(x, [5, 5, 5], symmetric=True)
    assert ((qn.double() - cont)[noisy].abs() <= 0.25 + 1e-6).all()  # half a step (2/4)/2


def test_noise_replays_under_checkpointing():
    from torch.utils.checkpoint import checkpoint

    f = FSQ([5, 5, 5], preserve_symmetry=True, noise_dropout=0.5, dim=8)
    x = torch.randn(64, 8, requires_grad=True)
    torch.manual_seed(9)
    (g1,) = torch.autograd.grad(f(x).quantized.square().sum(), x)
    torch.manual_seed(9)
    out = checkpoint(lambda t: f(t).quantized, x, use_reentrant=False)
    (g2,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=[]), "levels"),
        (dict(levels=5), "levels"),
        (dict(levels=[5, 1]), "levels"),
        (dict(levels=[5, 2.5]), "levels"),
        (dict(levels=[2, 5]), "preserve_symmetry"),
        (dict(levels=[5, 5], dim=0), "dim"),
        (dict(levels=[5, 5], num_codebooks=0), "num_codebooks"),
        (dict(levels=[5, 5], noise_dropout=1.5), "noise_dropout"),
        (dict(levels=[5, 5], bound_margin=1.0), "bound_margin"),
        (dict(levels=[5, 5], preserve_symmetry=1), "preserve_symmetry"),
        (dict(levels=[5, 5], nosie_dropout=0.1), "nosie_dropout"),
        (dict(levels=[2**32, 2**32]), "int64"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        FSQ(**kwargs)


def test_bad_inputs_name_themselves():
    f = FSQ([5, 5, 5])
    with pytest.raises(ValueError, match="x has 4 channels"):
        f(torch.randn(2, 4))
    with pytest.raises(TypeError, match="x must be float"):
        f(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        f(torch.randn(2, 3), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices must lie"):
        f.codes_from_indices(torch.tensor([125]))
    with pytest.raises(TypeError, match="indices must be an integer"):
        f.codes_from_indices(torch.tensor([1.0]))
    assert FSQ([2, 3], preserve_symmetry=True).codebook_size == 6
