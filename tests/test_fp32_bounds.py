"""The exact-fp32 bounds of benchmarks/fp32_bounds.py: the emulated roundings, the bound against
random and adversarial inputs (worst-case roundings, truncating accumulation in a bad order), and
the candidate re-scoring scheme's indices against the exact fp32 argmin."""

import json

import pytest
import torch

from benchmarks import fp32_bounds as fb

SCHEMES = sorted(fb.SCHEMES)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _bits(x: float) -> int:
    return torch.tensor([x], dtype=torch.float32).view(torch.int32).item()


def test_tf32_roundings_truncate_or_round_ties_away():
    one_ulp = 2.0**-10  # tf32 spacing at 1
    x = torch.tensor([1 + one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 4, 1 + 3 * one_ulp / 4])
    assert fb.round_tf32_rna(x).tolist() == [1 + one_ulp, -(1 + one_ulp), 1.0, 1 + one_ulp]
    assert fb.round_tf32_rz(x).tolist() == [1.0, -1.0, 1.0, 1.0]
    # a carry into the exponent: the largest value below 2 rounds to 2
    below_two = torch.tensor([2 - 2.0**-23])
    assert fb.round_tf32_rna(below_two).item() == 2.0
    assert fb.round_tf32_rz(below_two).item() == 2 - one_ulp
    y = torch.randn(10000)
    for fn, u in ((fb.round_tf32_rz, 2.0**-10), (fb.round_tf32_rna, 2.0**-11)):
        r = fn(y)
        assert ((r - y).abs() <= u * y.abs()).all()
        assert (r.view(torch.int32) & 0x1FFF == 0).all()  # 10 mantissa bits left
    assert torch.equal(fb.round_bf16(y), y.bfloat16().float())


@pytest.mark.parametrize("name", SCHEMES)
def test_split_representation_error_within_its_bound(name):
    s = fb.SCHEMES[name]
    z, c = torch.randn(200, 33), torch.randn(300, 33)
    zp, cp = fb.operands(z, c, s)
    assert zp.shape == (200, 33 * s.products) and cp.shape == (300, 33 * s.products)
    e, sfac = s.rep_error()
    # per element: the part products in fp64 (exact) against z_i c_i
    per = zp.double().view(200, 1, s.products, 33) * cp.double().view(1, 300, s.products, 33)
    exact = z.double()[:, None, :] * c.double()[None, :, :]
    assert ((per.sum(2) - exact).abs() <= e * exact.abs()).all()
    assert (per.abs().sum(2) <= sfac * exact.abs() * (1 + 1e-12)).all()


def _worst_ratio(z, c, name, per_code):
    zs, cs, norms = fb.scaled(z, c)
    s = fb.SCHEMES[name]
    cheap = fb.cheap_dist(zs, cs, norms, s)
    ex = fb.exact_dist(zs, cs, norms)
    b = fb.row_bounds(zs, norms, s, per_code=per_code)
    return float(((cheap - ex).abs() / (b if per_code else b[:, None])).max())


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("d", [1, 7, 64, 100])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 3e30])
def test_bound_holds_on_random_inputs(name, d, magnitude):
    z = torch.randn(64, d) * magnitude
    c = torch.randn(300, d) * magnitude
    c[5] = z[3]  # a code equal to a row: distance zero, cancellation in n - 2 z.c
    for per_code in (False, True):
        assert _worst_ratio(z, c, name, per_code) <= 1.0


def _worst_case_mantissas(shape, gen):
    """Positive values whose 13 low mantissa bits are all ones (tf32 truncation's largest error)
    or 0x1000 (a rounding tie): no cancellation, so the relative error of every dot is maximal."""
    x = torch.rand(shape, generator=gen) + 0.5
    bits = x.view(torch.int32) & ~0x1FFF
    low = torch.where(torch.rand(shape, generator=gen) < 0.5, 0x1FFF, 0x1000).to(torch.int32)
    return (bits | low).view(torch.float32)


def _rz_accumulate(terms: torch.Tensor) -> torch.Tensor:
    """fp32 sum over the last dim in order, each addition truncated toward zero (a tensor core's
    accumulation at its worst), computed exactly in fp64 then rounded toward zero."""
    acc = torch.zeros(terms.shape[:-1], dtype=torch.float32)
    for i in range(terms.shape[-1]):
        s64 = acc.double() + terms[..., i].double()
        f = s64.float()
        over = f.double().abs() > s64.abs()
        acc = torch.where(over, torch.nextafter(f, torch.zeros_like(f)), f)
    return acc


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("d", [16, 64])
def test_bound_holds_on_adversarial_inputs_and_accumulation(name, d):
    gen = torch.Generator().manual_seed(d)
    z = _worst_case_mantissas((24, d), gen)
    c = _worst_case_mantissas((40, d), gen)
    c[:, : d // 2] *= 2.0**-12  # tiny terms after large ones: truncation loses the most
    zs, cs, norms = fb.scaled(z, c)
    s = fb.SCHEMES[name]
    zp, cp = fb.operands(zs, cs, s)
    terms = zp[:, None, :] * cp[None, :, :]  # exact part products, (N, K, P D)
    order = torch.argsort(terms[0, 0].abs(), descending=True)  # largest first
    cheap = norms[None, :] - 2.0 * _rz_accumulate(terms[..., order])
    ex = fb.exact_dist(zs, cs, norms)
    # the exact side in another order too (reversed): the bound allows any order on both sides
    ex_rev = norms[None, :] - 2.0 * _rz_accumulate((zs[:, None, :] * cs[None, :, :]).flip(-1))
    b = fb.row_bounds(zs, norms, s)[:, None]
    err = (cheap - ex).abs()
    assert (err <= b).all(), float((err / b).max())
    # the exact side's own bound: half the budget at most (it is one of the two sides)
    assert ((ex_rev - ex).abs() <= b).all()
    # the emulation is not vacuous: the truncating cheap pass is off by a visible share of B
    if name == "tf32":
        assert float((err / b).max()) > 0.1


def _oracle(z, c):
    zs, cs, norms = fb.scaled(z, c)
    return fb.exact_dist(zs, cs, norms).argmin(dim=1)  # first occurrence: lowest index


def _near_ties(n, k, d, gen):
    """Rows with two or more codes at nearly (or exactly) the same distance."""
    c = torch.randn(k, d, generator=gen)
    c[k // 2 :] = c[: k - k // 2] + 1e-6 * torch.randn(k - k // 2, d, generator=gen)
    c[-1] = c[1]  # an exact duplicate: the lowest index must win
    z = c[torch.randint(0, k, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)
    z[0] = c[1] + 0.3 * torch.randn(d, generator=gen)
    return z, c


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("per_code", [False, True], ids=["per-row", "per-code"])
def test_scheme_is_exact(name, per_code):
    gen = torch.Generator().manual_seed(1)
    for z, c in (
        (torch.randn(150, 48, generator=gen), torch.randn(700, 48, generator=gen)),
        _near_ties(120, 200, 24, gen),
    ):
        r = fb.exact_search(z, c, name, per_code=per_code, block_n=64)
        assert torch.equal(r.indices, _oracle(z, c))
        assert r.max_err_ratio <= 1.0
        assert torch.equal(r.flagged, r.candidates > 1)
    if name in ("tf32", "bf16x2"):
        assert r.flagged.any()  # the re-score path ran


def test_scheme_picks_lowest_index_among_duplicates():
    c = torch.randn(50, 16)
    c[40] = c[7]
    c[45] = c[7]
    z = c[7:8] + 0.01
    for name in SCHEMES:
        r = fb.exact_search(z, c, name)
        assert r.indices.item() == 7
        assert r.candidates.item() >= 3


def test_measure_reports_every_scheme_and_no_mismatch():
    z, c = fb.gaussian(40, 300, 32, seed=0)
    out = fb.measure(z, c, ["tf32", "bf16x3"], block_n=16)
    assert set(out["results"]) == {"tf32/row", "tf32/code", "bf16x3/row", "bf16x3/code"}
    for r in out["results"].values():
        assert r["mismatch_vs_exact_fp32"] == 0 and r["max_err_over_bound"] <= 1.0
        assert 0 <= r["flagged_fraction"] <= 1
    assert out["references"]["exact_err_ratio"] <= 1.0


def test_empty_batch_is_valid():
    r = fb.exact_search(torch.empty(0, 8), torch.randn(5, 8))
    assert r.indices.shape == (0,) and r.indices.dtype == torch.int64
    assert r.flagged.shape == (0,)


@pytest.mark.parametrize(
    "z, c, kwargs, exc, match",
    [
        ([[1.0]], torch.randn(3, 1), {}, TypeError, "z must be a torch.Tensor"),
        (torch.randn(2, 4).double(), torch.randn(3, 4), {}, TypeError, "z must be float32"),
        (torch.randn(4), torch.randn(3, 4), {}, ValueError, "z must be 2-D"),
        (torch.randn(2, 4), torch.randn(3, 5), {}, ValueError, "D=4 but codebook has D=5"),
        (torch.randn(2, 4), torch.empty(0, 4), {}, ValueError, "codebook must hold"),
        (torch.full((2, 4), float("nan")), torch.randn(3, 4), {}, ValueError, "z must be finite"),
        (torch.randn(2, 4), torch.randn(3, 4), {"scheme": "fp8"}, ValueError, "scheme must be"),
        (torch.randn(2, 4), torch.randn(3, 4), {"block_n": 0}, ValueError, "block_n must be"),
    ],
)
def test_bad_input_names_the_argument(z, c, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fb.exact_search(z, c, **kwargs)


@pytest.mark.parametrize("d", [64, 256])
def test_truncated_tf32_needs_twice_the_round_to_nearest_bound(d):
    """Triton's tf32 pass truncates its inputs: on worst-case mantissas its error exceeds the
    bound built for rounding to nearest (2^-11 per input, what tf32_rescore's tau in
    fastvq/_search_triton.py assumed until it moved to the truncation bound) and stays within the
    truncation bound (2^-10)."""
    gen = torch.Generator().manual_seed(d)
    z, c = _worst_case_mantissas((32, d), gen), _worst_case_mantissas((256, d), gen)
    z = (z.view(torch.int32) | 0x1FFF).view(torch.float32)  # every low bit set: error ~2^-10
    c = (c.view(torch.int32) | 0x1FFF).view(torch.float32)
    zs, cs, norms = fb.scaled(z, c)
    err = (fb.cheap_dist(zs, cs, norms, fb.SCHEMES["tf32"]) - fb.exact_dist(zs, cs, norms)).abs()
    b_rz = fb.row_bounds(zs, norms, fb.SCHEMES["tf32"])[:, None]
    b_rn = fb.row_bounds(zs, norms, fb.SCHEMES["tf32_rna"])[:, None]
    assert (err <= b_rz).all()
    assert (err > b_rn).any()


def test_command_line_quick_run_writes_a_report_and_its_table(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert fb.main(["--quick", "--no-encoder", "--schemes", "tf32,bf16x3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"] == fb.MACHINE and set(report["sets"]) == {
        "gaussian D=64",
        "gaussian D=256",
    }
    capsys.readouterr()
    assert fb.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("| gaussian D=") == 4 and "| tf32 | 1 |" in table
