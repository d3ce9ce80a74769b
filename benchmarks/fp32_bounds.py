"""Exact fp32 nearest-code search from a cheap tensor-core pass: roundings, bounds, re-scoring.

    python -m benchmarks.fp32_bounds                 # Gaussian D=64/256 + Fashion-MNIST encoder
    python -m benchmarks.fp32_bounds --quick         # tiny sizes (CI)

The fused search ranks ``dist_k = ||c_k||^2 - 2 z.c_k`` (fp32 norms given, scaled inputs). A cheap
pass computes the dot on tensor cores from rounded inputs (one tf32 pass, or a hi/lo split in tf32
or bf16 with 2 or 3 products) and accumulates in fp32 in an order we do not control. This module
emulates those roundings on CPU in torch, gives a rigorous bound ``B`` on
``|cheap dist - exact fp32 dist|`` per row (derivation: docs/benchmarks.md, "Exact fp32 from a
cheap pass"), and the scheme built on it:

1. cheap pass: per row the best cheap distance ``best``;
2. candidates: the codes whose cheap distance is ``<= best + 2 B``; a row with one candidate is
   done (its cheap argmin is the exact one);
3. re-score the candidates of the other ("flagged") rows in exact fp32 and take the lowest-index
   minimum.

The exact fp32 distance is one fixed evaluation order (products rounded, summed one dimension
after another), so a code's distance has the same bits whether it is computed against the whole
codebook or among a row's candidates: torch's CPU matmul does not promise that (it changes with
the matrix shape). The bound holds for any fp32 evaluation order of either side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastvq._search_torch import code_norms, magnitude_scale

U32 = 2.0**-24  # fp32 unit roundoff (round to nearest)
# Tensor-core accumulation: each addition may truncate instead of rounding to nearest (Fasi et
# al., "Numerical behavior of NVIDIA tensor cores", 2021), and its order is unknown: twice U32.
U_ACC = 2.0**-23
# fp32's smallest normal number: tensor cores flush anything smaller (a split's low part too).
TINY = 2.0**-126
# Covers evaluating the bound, the row norm and the threshold in fp32 (each off by a few ulps
# of a quantity far above 2^-10 of it).
MARGIN = 1.0 + 2.0**-10

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE = "2-core CPU machine, shared"


def round_tf32_rz(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> tf32 by dropping the 13 low mantissa bits: what ``tl.dot(input_precision="tf32")``
    feeds the MMA (its PTX has no ``cvt``; the tensor core ignores those bits)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def round_tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> tf32 rounded to nearest, ties away from zero: PTX ``cvt.rna.tf32.f32``, which
    Triton's tf32x3 applies to each part (finite inputs; adding to the magnitude bits carries
    into the exponent exactly as rounding up does)."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32, round to nearest even (``.to(tl.bfloat16)``, ``cvt.rn.bf16.f32``)."""
    return x.to(torch.bfloat16).to(torch.float32)


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Tensor cores read fp32 subnormals as zero."""
    return torch.where(x.abs() < TINY, torch.zeros((), dtype=x.dtype), x)


@dataclass(frozen=True)
class Scheme:
    """One cheap pass: how each operand is rounded or split, and which part products it sums.

    ``rounding``: "tf32_rz", "tf32_rna" or "bf16"; ``u`` its unit roundoff (relative error of one
    rounding: 2^-10 for truncation to tf32, 2^-11 for tf32 to nearest, 2^-8 for bf16).
    ``split_z``/``split_c``: the operand is the sum of a high and a low part (``lo = round(x -
    hi)``) instead of one rounded value. Products: every (z part, c part) pair except lo x lo.
    """

    name: str
    rounding: str
    split_z: bool
    split_c: bool
    doc: str

    @property
    def u(self) -> float:
        return {"tf32_rz": 2.0**-10, "tf32_rna": 2.0**-11, "bf16": 2.0**-8}[self.rounding]

    @property
    def products(self) -> int:
        return (1 + self.split_z) * (1 + self.split_c) - (self.split_z and self.split_c)

    def rep_error(self) -> tuple[float, float]:
        """``(e, s)``: ``|sum of part products - z_i c_i| <= e |z_i c_i|`` and
        ``sum of |part products| <= s |z_i c_i|``, per element (no flush; see the docs)."""
        u = self.u
        if self.split_z and self.split_c:
            # z = zh + zl + rz, |zh| <= (1+u)|z|, |zl| <= u(1+u)|z|, |rz| <= u^2 |z|; the dropped
            # terms are zh rc + zl cl + zl rc + rz ch + rz cl + rz rc.
            e = u * u * (2 * (1 + u) + (1 + u) ** 2 + 2 * u * (1 + u) + u * u)
            return e, (1 + u) ** 2 * (1 + 2 * u)
        if self.split_z or self.split_c:
            # the single operand's rounding (u) plus the split one's remainder (u^2, times 1+u)
            return u + u * u * (1 + u), (1 + u) ** 3
        return 2 * u + u * u, (1 + u) ** 2


SCHEMES = {
    s.name: s
    for s in (
        Scheme(
            "tf32", "tf32_rz", False, False, "one tf32 pass as Triton runs it (truncated inputs)"
        ),
        Scheme("tf32_rna", "tf32_rna", False, False, "one tf32 pass on inputs rounded to nearest"),
        Scheme("tf32x2", "tf32_rna", False, True, "z in tf32; codes split hi + lo: 2 products"),
        Scheme("tf32x3", "tf32_rna", True, True, "Triton's tf32x3: both split, 3 products"),
        Scheme("bf16x2", "bf16", True, False, "z split hi + lo in bf16; codes in bf16: 2 products"),
        Scheme("bf16x3", "bf16", True, True, "both split hi + lo in bf16: 3 products"),
    )
}


def _round(x: torch.Tensor, rounding: str) -> torch.Tensor:
    fn = {"tf32_rz": round_tf32_rz, "tf32_rna": round_tf32_rna, "bf16": round_bf16}[rounding]
    return _flush(fn(x))


def _parts(x: torch.Tensor, rounding: str, split: bool) -> list[torch.Tensor]:
    hi = _round(x, rounding)
    # x - hi is exact in fp32 (hi is x with low bits changed, same exponent range)
    return [hi, _round(x - hi, rounding)] if split else [hi]


def operands(z: torch.Tensor, c: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z', C')`` with ``Z' @ C'.T`` the scheme's sum of part products: (N, P D), (K, P D).

    Every part product is exact in fp32 (tf32 x tf32 has 22 significant bits, bf16 x bf16 16), so
    the matmul differs from the tensor cores only in its summation order, which the bound covers.
    """
    zp = _parts(z, scheme.rounding, scheme.split_z)
    cp = _parts(c, scheme.rounding, scheme.split_c)
    pairs = [(a, b) for i, a in enumerate(zp) for j, b in enumerate(cp) if i + j < 2]
    return torch.cat([a for a, _ in pairs], dim=1), torch.cat([b for _, b in pairs], dim=1)


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    if n * u >= 1:
        raise ValueError(f"n={n} roundings at u={u} have no gamma bound")
    return n * u / (1 - n * u)


def bound_coefficients(scheme: Scheme, d: int) -> tuple[float, float, float]:
    """``(alpha, beta, eta)``: for every code, ``|cheap - exact fp32 dist| <= alpha S + beta n +
    eta`` with ``S = sum_i |z_i c_i| <= ||z|| ||c||``, ``n = ||c||^2`` (the fp32 norm both sides
    use) and inputs scaled to ``max |x| < 1`` (the launcher's power-of-two scale).

    Cheap side: part roundings (e S), accumulation of P D exact products (gamma_PD(U_ACC) s S),
    then ``fl(n - 2 acc)`` (U32 (n + 2 |acc|)); exact side: a D-term fp32 dot (gamma_D(U32) S)
    and the same subtraction. ``eta``: parts below fp32's normal range flushed to zero.
    """
    e, s = scheme.rep_error()
    g_acc = gamma(scheme.products * d, U_ACC)
    g_ref = gamma(d, U32)
    acc_cheap = s * (1 + g_acc)  # |acc| <= acc_cheap S, |exact dot| <= (1 + g_ref) S
    alpha = 2 * (e + g_acc * s + g_ref) + 2 * U32 * (acc_cheap + 1 + g_ref)
    beta = 2 * U32
    # per element at most 2 flushed parts (< TINY each) times a part of magnitude < 2, summed
    # over D, doubled by the "2 z.c"
    eta = 2 * d * 2 * TINY * 2 * scheme.products
    return alpha, beta, eta


def row_bounds(
    zs: torch.Tensor, norms: torch.Tensor, scheme: Scheme, per_code: bool = False
) -> torch.Tensor:
    """Bound on |cheap - exact fp32 dist| per row (N,), or per row and code (N, K) with
    ``per_code``. ``zs``: scaled rows (N, D); ``norms``: fp32 (K,) ``||s c||^2`` of finite codes.

    Per row it uses ``S <= ||z|| max_k ||c_k||`` and ``n <= max_k n_k``; per code ``||c_k||``.
    """
    alpha, beta, eta = bound_coefficients(scheme, zs.shape[1])
    znorm = torch.linalg.vector_norm(zs.to(torch.float64), dim=1)
    n64 = norms.to(torch.float64)
    if per_code:
        out = alpha * znorm[:, None] * n64.sqrt()[None, :] + beta * n64[None, :] + eta
    else:
        nmax = n64.max() if n64.numel() else torch.zeros((), dtype=torch.float64)
        out = alpha * znorm * nmax.sqrt() + beta * nmax + eta
    return (out * MARGIN).to(torch.float32)


def cheap_dist(zs: torch.Tensor, cs: torch.Tensor, norms: torch.Tensor, scheme: Scheme):
    """fp32 (N, K) ``norms - 2 acc``, ``acc`` the scheme's tensor-core dot (emulated)."""
    zp, cp = operands(zs, cs, scheme)
    return norms[None, :] - 2.0 * (zp @ cp.T)


def exact_dist(zs: torch.Tensor, cs: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """fp32 (N, K) ``norms - 2 z.c`` in one fixed order: products rounded, summed over d in
    order. Elementwise fp32 ops round the same whatever the shape, so a (row, code) pair gets
    the same bits in any call: the full search and a row's candidates agree exactly."""
    ct = cs.T.contiguous()  # (D, K)
    acc = torch.zeros(zs.shape[0], cs.shape[0], dtype=torch.float32)
    prod = torch.empty_like(acc)
    for i in range(zs.shape[1]):
        torch.mul(zs[:, i : i + 1], ct[i][None, :], out=prod)
        acc.add_(prod)
    return norms[None, :] - 2.0 * acc


def _check(z: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} must be finite (the bounds assume finite inputs)")


def scaled(z: torch.Tensor, codebook: torch.Tensor):
    """``(s z, s c, ||s c||^2)`` as the launcher scales them (power of two, max |x| < 1)."""
    s = magnitude_scale(z, codebook)
    return z * s, codebook * s, code_norms(codebook, scale=s)


@dataclass
class SchemeResult:
    indices: torch.Tensor  # int64 (N,)
    flagged: torch.Tensor  # bool (N,): rows with more than one candidate
    candidates: torch.Tensor  # int64 (N,): candidate count per row (1 for unflagged rows)
    max_err_ratio: float  # max over (row, code) of |cheap - exact| / bound (<= 1); 0 unchecked


def _block(zb, cs, norms, sch: Scheme, per_code: bool):
    """One row block of the scheme: ``(indices, candidate counts, cheap dist, bound)``."""
    cheap = cheap_dist(zb, cs, norms, sch)
    bound = row_bounds(zb, norms, sch, per_code=per_code)
    if per_code:
        # cheap_k - B_k <= e_k <= e_j <= cheap_j + B_j for the exact argmin k and every j
        upper = (cheap + bound).amin(dim=1)
        upper = upper + U32 * 4 * upper.abs()  # the sums' fp32 rounding, a few ulps upward
        cand = cheap - bound <= upper[:, None]
    else:
        thr = cheap.amin(dim=1) + 2.0 * bound
        cand = cheap <= (thr + U32 * 4 * thr.abs())[:, None]
    count = cand.sum(dim=1)
    out = cheap.argmin(dim=1)  # one candidate: the cheap argmin is the exact one
    rows = (count > 1).nonzero().squeeze(1)
    if rows.numel():
        # each flagged row's candidates, ascending, padded with code 0 masked to +inf
        m = int(count[rows].max())
        codes = torch.zeros(rows.numel(), m, dtype=torch.int64)
        valid = torch.arange(m)[None, :] < count[rows][:, None]
        codes[valid] = cand[rows].nonzero()[:, 1]
        cz = cs[codes]  # (F, m, D)
        # the exact order of exact_dist: products rounded, summed over d in order
        acc = torch.zeros(rows.numel(), m, dtype=torch.float32)
        for i in range(zb.shape[1]):
            acc.add_(zb[rows, i : i + 1] * cz[:, :, i])
        dist = torch.where(valid, norms[codes] - 2.0 * acc, torch.full((), float("inf")))
        # ascending codes: argmin's first occurrence is the lowest index among equal minima
        out[rows] = codes.gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)
    return out, count, cheap, bound


def _validate(z, codebook, scheme: str, block_n: int) -> None:
    _check(z, "z")
    _check(codebook, "codebook")
    if codebook.shape[0] < 1:
        raise ValueError("codebook must hold at least one code")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} but codebook has D={codebook.shape[1]}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if block_n < 1:
        raise ValueError(f"block_n must be >= 1, got {block_n}")


def exact_search(
    z: torch.Tensor,
    codebook: torch.Tensor,
    scheme: str = "tf32",
    *,
    per_code: bool = False,
    block_n: int = 512,
    check: bool = True,
) -> SchemeResult:
    """The scheme of this module, emulated: cheap pass, candidates within ``2 B``, exact re-score.

    Args:
        z: (N, D) float32 rows, finite; N = 0 is valid.
        codebook: (K, D) float32 codes, finite, K >= 1.
        scheme: a key of :data:`SCHEMES`.
        per_code: candidates from the per-code bound ``B_k`` (``cheap_k - B_k <= min_j cheap_j +
            B_j``) instead of the per-row one (``cheap_k <= min_j cheap_j + 2 B``).
        block_n: rows per block (memory: a few (block_n, K) fp32 matrices).
        check: also compute every exact distance to measure ``max_err_ratio`` (slow).

    Returns:
        :class:`SchemeResult`; ``indices`` (N,) is the lowest-index argmin of :func:`exact_dist`.
    """
    _validate(z, codebook, scheme, block_n)
    sch = SCHEMES[scheme]
    n = z.shape[0]
    zs, cs, norms = scaled(z, codebook)
    idx = torch.zeros(n, dtype=torch.int64)
    ncand = torch.ones(n, dtype=torch.int64)
    worst = 0.0
    for r0 in range(0, n, block_n):
        zb = zs[r0 : r0 + block_n]
        out, count, cheap, bound = _block(zb, cs, norms, sch, per_code)
        idx[r0 : r0 + block_n] = out
        ncand[r0 : r0 + block_n] = count
        if check:
            ex = exact_dist(zb, cs, norms)
            b = bound if per_code else bound[:, None]
            worst = max(worst, float(((cheap - ex).abs() / b).max()))
    return SchemeResult(idx, ncand > 1, ncand, worst)


def _references(zb, cs, norms):
    """Per row block: exact fp32 distances, their lowest-index argmin and the fp64 checks
    (``exact_err_ratio``: max |exact fp32 - fp64| over the fp32 side's own bound, <= 1;
    ``fp64_argmin_differs``: rows where fp64 picks another code, i.e. fp32 near-ties;
    ``fp64_gap_ratio``: their largest fp64 gap over the two codes' fp32 bounds, <= 1)."""
    g_ref = gamma(zb.shape[1], U32)
    ex = exact_dist(zb, cs, norms)
    ref = ex.argmin(dim=1)  # first occurrence: lowest index on ties
    n64 = norms.double()
    d64 = n64[None, :] - 2.0 * (zb.double() @ cs.double().T)
    s = torch.linalg.vector_norm(zb.double(), dim=1)[:, None] * n64.sqrt()[None, :]
    eb = 2 * g_ref * s + U32 * (n64[None, :] + 2 * (1 + g_ref) * s) + 1e-300
    a64 = d64.argmin(dim=1)
    diff = (a64 != ref).nonzero().squeeze(1)
    gap = 0.0
    if diff.numel():
        lim = eb[diff, ref[diff]] + eb[diff, a64[diff]]
        gap = float(((d64[diff, ref[diff]] - d64[diff, a64[diff]]) / lim).max())
    stats = dict(exact_err_ratio=float(((ex - d64).abs() / eb).max()),
                 fp64_argmin_differs=int(diff.numel()), fp64_gap_ratio=gap)  # fmt: skip
    return ex, ref, stats


def gaussian(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, d) and codes (k, d), standard normal, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def encoder_latents(n: int, k: int, steps: int, seed: int, codes: str = "sampled"):
    """Rows and codes (64-dim) from a small conv autoencoder trained briefly on Fashion-MNIST.

    Encoder: fastvq's ``conv_encoder(1, 32)`` (28x28 -> 64 x 7 x 7) and a 1x1 conv (the
    pre-quantisation projection of a VQ-VAE, no ReLU); decoder ``conv_decoder``; MSE, Adam,
    ``steps`` steps of 128 images. Codes: ``k`` distinct latents of training images
    (``codes="sampled"``), or the centres of 5 Lloyd steps from them over 4 ``k`` distinct
    training latents (``"kmeans"``); rows: ``n`` latents of test images. Returns ``(rows, codes,
    final training loss)``.
    """
    from torch import nn

    from fastvq.app.data import load_dataset, to_float
    from fastvq.models.ae import conv_decoder, conv_encoder

    torch.manual_seed(seed)
    data = load_dataset("fashion-mnist")
    enc = nn.Sequential(conv_encoder(1, 32), nn.Conv2d(64, 64, 1))
    dec = conv_decoder(1, 32)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = to_float(data.train.images[torch.randint(0, len(data.train), (128,), generator=g)])
        loss = (torch.sigmoid(dec(enc(x))) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def latents(images: torch.Tensor, rows: int) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 256):
                h = enc(to_float(images[i : i + 256]))  # (B, 64, 7, 7)
                out.append(h.permute(0, 2, 3, 1).reshape(-1, 64))
                if sum(t.shape[0] for t in out) >= rows:
                    break
        return torch.cat(out)

    pool = torch.unique(latents(data.train.images, 4 * k), dim=0)
    book = pool[torch.randperm(pool.shape[0], generator=g)[:k]]
    if codes == "kmeans":
        from fastvq.kmeans import kmeans

        book = kmeans(pool, k, iters=5, init=book, backend="torch")[0]
    elif codes != "sampled":
        raise ValueError(f"codes must be 'sampled' or 'kmeans', got {codes!r}")
    rows = latents(data.test.images, n)[:n]
    return rows.contiguous(), book.contiguous(), float(loss.detach())


def measure(z, codebook, schemes, modes=("row", "code"), block_n: int = 512) -> dict:
    """Every scheme and bound mode on one set: flagged fraction, candidates per flagged row, the
    largest ``|cheap - exact| / B`` and the rows whose index is not the exact fp32 argmin."""
    for name in schemes:
        _validate(z, codebook, name, block_n)
    zs, cs, norms = scaled(z, codebook)
    keys = [(s, m) for s in schemes for m in modes]
    acc = {k: dict(flagged=0, cand=0, max_cand=1, err=0.0, mismatch=0, cheap_wrong=0, sec=0.0)
           for k in keys}  # fmt: skip
    ref_stats = dict(exact_err_ratio=0.0, fp64_argmin_differs=0, fp64_gap_ratio=0.0)
    for r0 in range(0, zs.shape[0], block_n):
        zb = zs[r0 : r0 + block_n]
        ex, ref, st = _references(zb, cs, norms)
        for f in ("exact_err_ratio", "fp64_gap_ratio"):
            ref_stats[f] = max(ref_stats[f], st[f])
        ref_stats["fp64_argmin_differs"] += st["fp64_argmin_differs"]
        for s, m in keys:
            t0 = time.perf_counter()
            out, count, cheap, bound = _block(zb, cs, norms, SCHEMES[s], m == "code")
            a = acc[(s, m)]
            a["sec"] += time.perf_counter() - t0
            flagged = count > 1
            a["flagged"] += int(flagged.sum())
            a["cand"] += int(count[flagged].sum())
            a["max_cand"] = max(a["max_cand"], int(count.max()))
            b = bound if m == "code" else bound[:, None]
            a["err"] = max(a["err"], float(((cheap - ex).abs() / b).max()))
            a["mismatch"] += int((out != ref).sum())
            # what the cheap pass alone would get wrong (its first minimum, like the kernel)
            a["cheap_wrong"] += int((cheap.argmin(dim=1) != ref).sum())
    n = zs.shape[0]
    res = {}
    for (s, m), a in acc.items():
        res[f"{s}/{m}"] = dict(
            rows=n, flagged_rows=a["flagged"], flagged_fraction=a["flagged"] / max(n, 1),
            mean_candidates_per_flagged_row=a["cand"] / max(a["flagged"], 1),
            max_candidates=a["max_cand"], max_err_over_bound=a["err"],
            mismatch_vs_exact_fp32=a["mismatch"], cheap_argmin_wrong=a["cheap_wrong"],
            seconds=round(a["sec"], 1),
        )  # fmt: skip
        print(f"{s:9s} {m:4s}", res[f"{s}/{m}"], flush=True)
    print("references", ref_stats, flush=True)
    return dict(results=res, references=ref_stats)


def matmul_subset_differs(d: int, seed: int = 0) -> dict:
    """Why :func:`exact_dist` is not a matmul: entries of a 512 x 4096 fp32 product recomputed as
    products of row and column subsets (1 to 100 rows, 37 columns), counted where the bits
    differ. One thread."""
    g = torch.Generator().manual_seed(seed)
    z, c = torch.randn(512, d, generator=g), torch.randn(4096, d, generator=g)
    full = z @ c.T
    bad = total = 0
    for m in (1, 2, 3, 7, 16, 100):
        rows = torch.randint(0, 512, (m,), generator=g)
        cols = torch.randint(0, 4096, (37,), generator=g)
        sub = z[rows] @ c[cols].T
        bad += int((sub != full[rows][:, cols]).sum())
        total += sub.numel()
    return dict(d=d, differing=bad, compared=total)


def markdown(report: dict) -> str:
    """The docs' table from a report of :func:`main`."""
    out = ["| data | scheme | products | cheap argmin wrong | flagged rows, per-row B | "
           "candidates per flagged row | flagged rows, per-code B | candidates per flagged row | "
           "max err / B | rows not exact |", "|" + "---|" * 10]  # fmt: skip
    for name, v in report["sets"].items():
        for s in SCHEMES.values():
            r, c = v["results"].get(f"{s.name}/row"), v["results"].get(f"{s.name}/code")
            if r is None or c is None:
                continue
            out.append(
                f"| {name} (N={r['rows']}) | {s.name} | {s.products} | "
                f"{r.get('cheap_argmin_wrong', '-')} | "
                f"{100 * r['flagged_fraction']:.2f}% | {r['mean_candidates_per_flagged_row']:.2f} "
                f"(max {r['max_candidates']}) | {100 * c['flagged_fraction']:.2f}% | "
                f"{c['mean_candidates_per_flagged_row']:.2f} (max {c['max_candidates']}) | "
                f"{max(r['max_err_over_bound'], c['max_err_over_bound']):.2f} | "
                f"{r['mismatch_vs_exact_fp32'] + c['mismatch_vs_exact_fp32']} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--rows", type=int, default=4096, help="rows per Gaussian set")
    ap.add_argument("--codes", type=int, default=16384)
    ap.add_argument("--encoder-rows", type=int, default=4096)
    ap.add_argument("--encoder-steps", type=int, default=300)
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument("--no-gaussian", action="store_true")
    ap.add_argument("--encoder-codes", choices=("sampled", "kmeans"), default="sampled")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a saved report; exit")
    ap.add_argument("--matmul-check", action="store_true", help="matmul_subset_differs; exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    torch.set_num_threads(1)
    if args.matmul_check:
        print(json.dumps([matmul_subset_differs(d) for d in (64, 256)]))
        return 0
    torch.set_num_threads(1)
    if args.quick:
        args.rows, args.codes, args.encoder_rows, args.encoder_steps = 64, 512, 64, 5
    schemes = args.schemes.split(",")
    sets = {}
    for d in () if args.no_gaussian else (64, 256):
        z, c = gaussian(args.rows, args.codes, d, seed=d)
        sets[f"gaussian D={d}"] = dict(meta=dict(n=args.rows, k=args.codes, d=d),
                                       **measure(z, c, schemes))  # fmt: skip
    if not args.no_encoder:
        z, c, loss = encoder_latents(args.encoder_rows, args.codes, args.encoder_steps, seed=0,
                                     codes=args.encoder_codes)  # fmt: skip
        meta = dict(n=z.shape[0], k=c.shape[0], d=64, train_steps=args.encoder_steps,
                    final_mse=loss, codes=args.encoder_codes)  # fmt: skip
        name = "fashion-mnist encoder D=64" + (", k-means codes" * (args.encoder_codes == "kmeans"))
        sets[name] = dict(meta=meta, **measure(z, c, schemes))
    report = dict(
        command="python -m benchmarks.fp32_bounds " + " ".join(argv if argv else sys.argv[1:]),
        machine=MACHINE, date=datetime.date.today().isoformat(), torch=torch.__version__,
        python=platform.python_version(), threads=1,
        coefficients={f"{s} D={d}": bound_coefficients(SCHEMES[s], d)
                      for s in schemes for d in (64, 256)},  # (alpha, beta, eta)
        sets=sets,
    )  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    failed = [
        (s, k) for s, v in sets.items() for k, r in v["results"].items()
        if r["mismatch_vs_exact_fp32"] or r["max_err_over_bound"] > 1
    ] + [s for s, v in sets.items() if v["references"]["exact_err_ratio"] > 1]  # fmt: skip
    if failed:
        print("FAILED:", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
