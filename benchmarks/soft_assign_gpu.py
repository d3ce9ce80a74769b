"""``fastvq.soft_assign`` on a GPU: the fused op (Triton) against the literal materialised one.

    OUT=/dir python -m benchmarks.soft_assign_gpu              # run by benchmarks/gpu_check.sh
    OUT=/dir python -m benchmarks.soft_assign_gpu --dry-run    # CPU: Triton interpreted, tiny

Each case times forward + backward of every output (lse, E_p[x], p @ C, column sums, each with a
fixed random upstream weight; the argmax too) to z and C, "dot" similarity, fp32 inputs:

- ``fused``: ``fastvq.soft_assign(..., backend="triton")``, nothing N x K held;
- ``literal``: ``logits = z @ C.T / tau``, softmax, every output from the N x K matrices and the
  backward by autograd, as every public implementation does it; only where its estimated peak
  (:data:`LITERAL_NXK_COPIES` N x K fp32 matrices) fits in free GPU memory.

Per implementation: median wall time of ``--reps`` calls after one warm-up call (CUDA events;
``time.perf_counter`` on CPU) and ``torch.cuda.max_memory_allocated`` growth over one call with
the inputs allocated before it, plus the largest difference between the two (lse, dz, dC)
where both ran. The last case is the fused op alone at K = 2^18, N = 16384, D = 64 (one N x K
fp32 matrix there is 16 GiB). Results go to ``$OUT/soft_assign_gpu.json`` after every case, so
a run cut by its time limit keeps what it measured; cases run cheapest first.
"""

from __future__ import annotations

import sys

import torch

from ._cuda_timing import StageResults, measure, mib, stage_cli

# (N, K, D): fused vs literal; then the fused op alone at the size. D = 100 runs the
# kernels' D loop (benchmarks/gpu_static.py gates its tiles).
CASES = [(16384, 4096, 64), (16384, 16384, 64), (16384, 65536, 64), (16384, 16384, 100)]
BIG = (16384, 1 << 18, 64)
DRY_CASES = [(24, 40, 16), (20, 35, 33)]  # interpreted: a few seconds of CPU in all
DRY_BIG = (16, 128, 16)
# The literal path's peak: logits, p, the saved softmax and logsumexp outputs and the backward's
# N x K gradients alive at once (about 6 measured by autograd's saved tensors, 2 of margin).
LITERAL_NXK_COPIES = 8
TEMPERATURE = 1.0


def _literal(z, c, tau):
    logits = z @ c.T / tau
    p = logits.softmax(1)
    lse = logits.logsumexp(1)
    return lse, logits.argmax(1), (p * logits).sum(1), p @ c, p.sum(0)


def _fused(z, c, tau):
    import fastvq

    o = fastvq.soft_assign(z, c, temperature=tau, backend="triton")
    return o.lse, o.index, o.expected_logit, o.expected_code, o.column_sums


def _step(fn, z, c, ups):
    """Forward and backward of every output: (outputs, dz, dC)."""
    lse, idx, e, q, col = fn(z, c, TEMPERATURE)
    loss = (lse * ups[0]).sum() + (e * ups[1]).sum() + (q * ups[2]).sum() + (col * ups[3]).sum()
    dz, dc = torch.autograd.grad(loss, (z, c))
    return (lse.detach(), idx), dz, dc


def _inputs(n, k, d, dev):
    g = torch.Generator(device="cpu").manual_seed(n + k + d)
    z = torch.randn(n, d, generator=g).to(dev).requires_grad_()
    c = (torch.randn(k, d, generator=g) / d**0.5).to(dev).requires_grad_()
    ups = [torch.randn(n, generator=g).to(dev), torch.randn(n, generator=g).to(dev),
           torch.randn(n, d, generator=g).to(dev), torch.randn(k, generator=g).to(dev)]  # fmt: skip
    return z, c, ups


def _literal_fits(n, k, dev) -> bool:
    need = LITERAL_NXK_COPIES * n * k * 4
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(dev)
    return need < free


def _configs(n, k, d, dev) -> dict:
    """The launcher's tiles per kernel (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages, D_CHUNK)."""
    from fastvq import _soft_assign_triton as sa

    arch = None
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        arch = 10 * major + minor
    return {kern: list(sa.pick_config(kern, n, k, d, arch=arch)) for kern in sa.KERNELS}


def run_case(n, k, d, dev, reps, literal: bool) -> dict:
    z, c, ups = _inputs(n, k, d, dev)
    rec = {"N": n, "K": k, "D": d, "similarity": "dot", "dtype": "float32",
           "nxk_fp32_mib": round(n * k * 4 / 2**20, 1),
           "configs": _configs(n, k, d, dev)}  # fmt: skip
    t, times, growth, fused = measure(lambda: _step(_fused, z, c, ups), dev, reps)
    rec["fused"] = {"median_s": t, "times_s": times, "peak_growth_mib": mib(growth)}
    if literal and _literal_fits(n, k, dev):
        t, times, growth, lit = measure(lambda: _step(_literal, z, c, ups), dev, reps)
        rec["literal"] = {"median_s": t, "times_s": times, "peak_growth_mib": mib(growth)}
        rec["speedup"] = rec["literal"]["median_s"] / rec["fused"]["median_s"]
        (lse_f, idx_f), dz_f, dc_f = fused
        (lse_l, idx_l), dz_l, dc_l = lit
        rec["max_abs_diff"] = {
            "lse": (lse_f - lse_l).abs().max().item(),
            "dz": (dz_f - dz_l).abs().max().item(),
            "dC": (dc_f - dc_l).abs().max().item(),
        }
        rec["argmax_agree"] = (idx_f == idx_l).float().mean().item()
    elif literal:
        rec["literal"] = "skipped: estimated peak above free GPU memory"
    return rec


def main(argv=None) -> int:
    parsed = stage_cli(__doc__.split("\n")[0], "implementation", argv)
    if parsed is None:
        return 3
    a, dev = parsed
    cases, big = (DRY_CASES, DRY_BIG) if a.dry_run else (CASES, BIG)
    res = StageResults(
        "soft_assign_gpu", argv, a, dev,
        what="forward + backward of every output to z and C; median of reps after a warm-up",
    )  # fmt: skip
    plan = [(case, True) for case in cases[:2]] + [(big, False)]
    plan += [(case, True) for case in cases[2:]]
    for (n, k, d), literal in plan:
        rec = run_case(n, k, d, dev, a.reps, literal)
        lit = rec.get("literal")
        lit_s = (f"literal {lit['median_s'] * 1e3:.2f} ms, {lit['peak_growth_mib']} MiB; "
                 f"speed-up {rec['speedup']:.2f}x" if isinstance(lit, dict)
                 else lit or "literal not run")  # fmt: skip
        res.add(rec, f"N={n} K={k} D={d}: fused {rec['fused']['median_s'] * 1e3:.2f} ms, "
                     f"{rec['fused']['peak_growth_mib']} MiB; {lit_s}")  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
