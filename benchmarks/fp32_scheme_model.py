"""What the static model predicts for exact fp32 by candidates, against today's tf32x3 default.

    python -m benchmarks.fp32_scheme_model --bounds benchmarks/results/fp32-bounds-2026-12-07.json

Two schemes of benchmarks/fp32_bounds.py, each as three GPU passes:

- "tf32_rna + candidates": pass 1 is today's ``tf32_rescore`` binary (one tf32 pass that also
  keeps each row's runner-up) on copies rounded to tf32 by the launcher's scale pass; pass 2
  searches the flagged rows again with the plain tf32 binary, listing the codes under the row's
  threshold; pass 3 re-scores those few codes in fp32 on CUDA cores.
- "bf16x3 + candidates": pass 1 is the bf16 binary at D' = 3 D on the split operands
  ``[zh | zh | zl]`` and ``[ch | cl | ch]`` (bf16, made by the scale pass), with the runner-up
  kept (the kernel's TRACK_SECOND, compiled here for bf16); pass 2 the plain bf16 binary at 3 D on
  the flagged rows; pass 3 as above.

Assumptions, all stated in docs/benchmarks.md: pass 2 runs the flagged rows with the launcher's
split-K rule (:func:`subset_ms`); pass 3 and the host sync for the flagged count cost
``FIXED_MS``. The flagged fraction is the Gaussian per-row figure of the bounds JSON. The
kernel does not exist in this form (the gather would read D, the search 3 D): the prediction is
for its search passes. Every figure is also given times the per-class calibration of
:func:`benchmarks.gpu_model.calibration` (median measured / predicted on the H200).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
from pathlib import Path

FIXED_MS = 0.03  # pass 3 launch, candidate gather and one host sync: an assumption, not measured
N = 65536
DEVICES = ("H100", "H200")


@contextlib.contextmanager
def _tracking_runner_up():
    """``plan_search`` returning plans that keep the runner-up whatever the dtype (the launcher
    asks for it only in tf32_rescore); only inside this block, for compiling."""
    from fastvq import _search_triton as vs

    orig = vs.plan_search
    vs.plan_search = lambda *a, **k: orig(*a, **k)._replace(track_second=True)
    try:
        yield
    finally:
        vs.plan_search = orig


def tf32_conversions() -> dict:
    """The ``cvt`` and MMA instructions in the PTX of a bare 64 x 64 fp32 ``tl.dot`` per input
    precision and arch: whether the tensor core gets rounded or raw fp32 bits (the bounds of
    benchmarks/fp32_bounds.py depend on it)."""
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def dot64(a_ptr, b_ptr, o_ptr, PRECISION: tl.constexpr):
        o = tl.arange(0, 64)
        a = tl.load(a_ptr + o[:, None] * 64 + o[None, :])
        b = tl.load(b_ptr + o[:, None] * 64 + o[None, :])
        c = tl.dot(a, b, input_precision=PRECISION)
        tl.store(o_ptr + o[:, None] * 64 + o[None, :], c)

    out = {}
    sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "o_ptr": "*fp32", "PRECISION": "constexpr"}
    for prec in ("tf32", "tf32x3"):
        for arch, threads in ((90, 64), (80, 32)):
            src = ASTSource(fn=dot64, signature=sig, constexprs={(3,): prec})
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, threads),
                                 options=dict(num_warps=4, num_stages=1)).asm["ptx"]  # fmt: skip
            out[f"{prec} sm_{arch}"] = dict(
                cvt=sorted(set(re.findall(r"cvt\.rn\w*\.tf32\.f32|cvt\.rna\.tf32\.f32", ptx))),
                mma=sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*tf32[\w.]*", ptx))),
            )  # fmt: skip
    return out


def compile_binaries(ds=(64, 256)) -> dict:
    """Records (benchmarks.gpu_static's) of every binary the prediction needs, sm_90."""
    from benchmarks.gpu_static import Binary, compile_one, gate_failures

    recs = {}
    for d in ds:
        for prec in ("tf32x3", "tf32", "tf32_rescore"):
            b = Binary(f"fp32 {prec} D{d}", "search", 90, True, z_dtype="float32",
                       c_dtype="float32", d=d, fp32_precision=prec)  # fmt: skip
            recs[b.name] = compile_one(b)
        b = Binary(f"bf16 D{3 * d}", "search", 90, True, d=3 * d)
        recs[b.name] = compile_one(b)
        b = Binary(f"bf16 D{3 * d} track", "search", 90, True, d=3 * d)
        with _tracking_runner_up():
            recs[b.name] = compile_one(b)
        assert recs[b.name]["meta"]["track_second"]
    for r in recs.values():
        r["gate"] = gate_failures(r)  # spills etc.: reported beside the prediction
    return recs


def subset_ms(rec: dict, device: str, rows: float, k: int, d: int, prec, ez: int) -> float:
    """Kernel time of ``rec`` on ``rows`` flagged rows over all ``k`` codes, with the launcher's
    split-K rule (``plan_search``: split K when the row blocks leave SMs idle), in the static
    model's tile cycles and waves."""
    from benchmarks.gpu_model import DEVICES, tile_cycles

    dev = DEVICES[device]
    bn, bk = rec["meta"]["config"][:2]
    tile = tile_cycles(rec, dev, d, prec, ez, ez)["tile"]
    row_blocks = max(1, math.ceil(rows / bn))
    splits = 1
    if row_blocks < dev["sms"] and k >= 32 * bk:
        splits = min(math.ceil(2 * dev["sms"] / row_blocks), k // (16 * bk))
    k_per_split = math.ceil(math.ceil(k / splits) / bk) * bk
    b = max(1, rec["blocks_per_sm"])
    waves = math.ceil(row_blocks * splits / (dev["sms"] * b))
    return waves * b * (k_per_split // bk) * tile / (dev["ghz"] * 1e6)


def predictions(recs: dict, bounds: dict, calib: dict) -> list[dict]:
    from benchmarks.gpu_model import predict

    rows = []
    for device in DEVICES:
        for d in (64, 256):
            res = bounds["sets"][f"gaussian D={d}"]["results"]
            for k in (16384, 65536):
                p = lambda name, dd, ez, prec, dev=device, kk=k: predict(  # noqa: E731
                    {}, dev, N, kk, dd, "", ez, ez, prec, rec=recs[name]
                )
                x3 = p(f"fp32 tf32x3 D{d}", d, 4, "tf32x3")["fused_ms"]
                tf32 = p(f"fp32 tf32 D{d}", d, 4, "tf32")
                f_a = res["tf32_rna/row"]["flagged_fraction"]
                a1 = p(f"fp32 tf32_rescore D{d}", d, 4, "tf32")["fused_ms"]
                rec = recs[f"fp32 tf32 D{d}"]
                a_of = lambda f, rec=rec, dev=device, kk=k, dd=d, a1=a1: (  # noqa: E731
                    a1 + subset_ms(rec, dev, f * N, kk, dd, "tf32", 4) + FIXED_MS
                )
                a = a_of(f_a)
                # the flagged fraction at which it stops beating tf32x3 (None: never, in 0..1)
                even = next((i / 200 for i in range(201) if a_of(i / 200) >= x3), None)
                f_b = res["bf16x3/row"]["flagged_fraction"]
                b1 = p(f"bf16 D{3 * d} track", 3 * d, 2, None)["fused_ms"]
                b2 = subset_ms(recs[f"bf16 D{3 * d}"], device, f_b * N, k, 3 * d, None, 2)
                b = b1 + b2 + FIXED_MS
                cal = lambda ms, cls: ms * calib.get(cls, float("nan"))  # noqa: E731
                rows.append(dict(
                    device=device, n=N, k=k, d=d, tf32x3_ms=x3, tf32_ms=tf32["fused_ms"],
                    tf32_rna_cand_ms=a, tf32_rna_pass1_ms=a1, tf32_rna_pass2_ms=a - a1 - FIXED_MS,
                    tf32_rna_flagged=f_a, tf32_rna_breakeven_flagged=even,
                    bf16x3_cand_ms=b,
                    bf16x3_flagged=f_b,
                    calibrated=dict(tf32x3_ms=cal(x3, "fp32 tf32x3"),
                                    tf32_ms=cal(tf32["fused_ms"], "fp32 tf32"),
                                    tf32_rna_cand_ms=cal(a, "fp32 tf32"),
                                    bf16x3_cand_ms=cal(b, "bf16")),
                ))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| device | D | K | tf32x3 (today) | tf32 single pass | tf32_rna + candidates "
           "(flagged) | its break-even flagged fraction | bf16x3 + candidates (flagged) |",
           "|" + "---|" * 8]  # fmt: skip
    for r in rows:
        c, even = r["calibrated"], r["tf32_rna_breakeven_flagged"]
        out.append(
            f"| {r['device']} | {r['d']} | {r['k']} | {r['tf32x3_ms']:.2f} ({c['tf32x3_ms']:.2f}) "
            f"| {r['tf32_ms']:.2f} ({c['tf32_ms']:.2f}) | {r['tf32_rna_cand_ms']:.2f} "
            f"({c['tf32_rna_cand_ms']:.2f}; {100 * r['tf32_rna_flagged']:.1f}%) | "
            f"{'none up to 100%' if even is None else f'{100 * even:.1f}%'} | "
            f"{r['bf16x3_cand_ms']:.2f} ({c['bf16x3_cand_ms']:.2f}; "
            f"{100 * r['bf16x3_flagged']:.2f}%) |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before the first triton import: cubins wanted
    import triton

    from benchmarks.gpu_model import MEASURED_H200, calibration, load_static

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bounds", required=True, help="JSON of benchmarks.fp32_bounds")
    ap.add_argument("--out", type=Path, help="JSON path (default: print only)")
    a = ap.parse_args(argv)
    bounds = json.loads(Path(a.bounds).read_text())
    calib = calibration(load_static(), MEASURED_H200)["factors"]
    cvts = tf32_conversions()
    for name, v in cvts.items():
        print(f"{name}: tf32 conversions {v['cvt'] or 'none'}; {v['mma']}")
    recs = compile_binaries()
    for name, r in recs.items():
        print(f"{name}: config {r['meta']['config']}, regs {r['regs']}, "
              f"gate {r['gate'] or 'passes'}")  # fmt: skip
    rows = predictions(recs, bounds, calib)
    table = markdown(rows)
    print(table)
    if a.out:
        doc = dict(
            binaries={n: dict(config=r["meta"]["config"], regs=r["regs"], gate=r["gate"],
                              loop_per_element=r["loop_per_element"],
                              blocks_per_sm=r["blocks_per_sm"]) for n, r in recs.items()},
            command="python -m benchmarks.fp32_scheme_model " + " ".join(argv or sys.argv[1:]),
            date=datetime.date.today().isoformat(), triton=triton.__version__,
            machine="2-core CPU machine, shared: ahead-of-time sm_90 compiles, no GPU",
            fixed_ms=FIXED_MS, calibration=calib, rows=rows, markdown=table,
            tf32_conversions=cvts,
        )  # fmt: skip
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
