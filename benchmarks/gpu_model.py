"""Static speed model of the fused search, from the SASS counts of benchmarks/gpu_static.py.

    python -m benchmarks.gpu_model                         # table for H100, H200, A100
    python -m benchmarks.gpu_model --device H200 --json    # what gpu_check.sh prints beside timings

Per code tile (BLOCK_N rows x BLOCK_K codes x D) of one program:

- tensor cycles = 2 BN BK D_eff x (3 for tf32x3) / (dense tensor FLOP per clock per SM), with
  D_eff = D rounded up to BLOCK_D (masked lanes still cost MMAs);
- epilogue cycles = the largest of: FMA-pipe instructions x warps x 32 / 128 lanes, ALU-pipe
  (compare, select, min/max, integer, moves) x warps x 32 / 64 lanes, and all instructions x warps
  / 4 (one issue per scheduler per clock), counted in the code-tile loop's SASS (a nested D loop
  counted ceil(D / BLOCK_D) times);
- L2 cycles = bytes the tile reads (the code tile, and the row tile when it is not held across
  the loop) / L2 bytes per clock per SM.

With one program per SM the MMAs wait for the previous epilogue (tensor + epilogue); with two or
more they overlap (the largest of the three). Programs run in waves of SMs x programs-per-SM.
Around the kernel: the scale pass, the scaled codebook copy, the norms and the gather, at HBM
speed. The yardstick is one cuBLAS GEMM of the same shape writing its N x K output (in the input
dtype; fp32 through TF32 as the matmul benchmark provider sets), at 75% of dense peak or at HBM
speed for its output, whichever is slower.

Every figure is a prediction from published per-SM rates (NVIDIA whitepapers; the L2 bandwidth
is an assumption, stated in DEVICES) and static instruction counts: a GPU run
(benchmarks/gpu_check.sh) prints it next to the measurement.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Dense rates per SM per clock, clocks and bandwidths. "l2_tbs" is an assumption (no vendor figure;
# microbenchmarks report 5-7 TB/s on H100), the others come from the vendors' data sheets.
DEVICES = {
    "H100": dict(arch=90, sms=132, ghz=1.83, bf16=4096, tf32=2048, hbm_tbs=3.35, l2_tbs=5.5,
                 gemm_bf16_tflops=989, gemm_tf32_tflops=495),
    "H200": dict(arch=90, sms=132, ghz=1.98, bf16=4096, tf32=2048, hbm_tbs=4.8, l2_tbs=6.0,
                 gemm_bf16_tflops=989, gemm_tf32_tflops=495),
    "A100": dict(arch=80, sms=108, ghz=1.41, bf16=2048, tf32=1024, hbm_tbs=2.0, l2_tbs=4.0,
                 gemm_bf16_tflops=312, gemm_tf32_tflops=156),
}  # fmt: skip
GEMM_EFFICIENCY = 0.75
ALU_CLASSES = ("cmp_sel", "int_alu", "move")

CASES_N = 65536
CASES_D = (64, 256)
CASES_K = (16384, 65536)
# (label, binary-name prefix, element bytes of z and of the codebook, precision)
PRECISIONS = [
    ("bf16", "bf16", 2, 2, None),
    # the sm_90 default for bf16 (the Gluon kernel; the "bf16" rows are its Triton fallback there)
    ("bf16 Gluon", "gluon bf16", 2, 2, None),
    ("fp32 tf32x3", "fp32 tf32x3", 4, 4, "tf32x3"),
    ("fp32 tf32", "fp32 tf32", 4, 4, "tf32"),
    ("fp32 tf32_rescore", "fp32 tf32_rescore", 4, 4, "tf32_rescore"),
    ("fp32 ieee", "fp32 ieee", 4, 4, "ieee"),
    ("autocast mix tf32x3", "mix tf32x3", 2, 4, "tf32x3"),
]


def load_static(path: str | None = None) -> dict:
    """The newest committed static report of the search (or ``path``): the dated
    ``gpu-static-YYYY-MM-DD.json`` files, not the per-kernel ones such as ``gpu-static-soft-*``."""
    if path is None:
        found = sorted(glob.glob(str(RESULTS / "gpu-static-2*.json")))
        if not found:
            raise FileNotFoundError("no benchmarks/results/gpu-static-*.json: run gpu_static")
        path = found[-1]
    return json.loads(Path(path).read_text())


def find(static: dict, arch: int, name: str) -> dict:
    for r in static["binaries"]:
        if (
            r["arch"] == arch
            and r["default"]
            and (r["name"] == name or name in r["meta"].get("aliases", []))
        ):
            return r
    raise KeyError(f"no default binary {name!r} for sm_{arch} in the static report")


def tile_cycles(rec: dict, dev: dict, d: int, precision: str | None, ez: int, ec: int) -> dict:
    """Cycles of one code tile of one program: tensor, epilogue and L2 (see the module docstring).

    The sm_90 Gluon search (``kernel`` "search_gluon", kernels/vq_search_sm90.py) differs in
    four places: its loop covers one tile per stage (``tiles_per_trip``: the counts are divided
    by it), each tile's MMA has a 16-wide norm step on top of D, its norms come as 16 bf16
    pieces per code, and tiles go in pairs whose first epilogue runs under the second tile's
    MMAs while the second's runs alone (one program per SM): a pair takes T + max(T, E) + E, or
    the L2 time of its two tiles.
    """
    bn, bk, bd = rec["meta"]["config"][:3]
    warps = rec["num_warps"]
    d_eff = math.ceil(d / bd) * bd
    loop = rec["loop"] or {}
    outer, inner = loop.get("outer") or {}, loop.get("inner")
    reps = math.ceil(d / bd) if inner else 1
    cnt = {c: outer.get(c, 0) + (inner[c] * reps if inner else 0) for c in outer}
    gluon = rec.get("kernel") == "search_gluon"
    if gluon:
        cnt = {c: v / rec["tiles_per_trip"] for c, v in cnt.items()}
    mult = 3 if precision == "tf32x3" else 1
    if precision == "ieee":
        tensor = 0.0
    else:
        rate = dev["bf16"] if precision is None else dev["tf32"]
        tensor = 2 * bn * bk * (d_eff + 16 * gluon) * mult / rate
    fma = cnt.get("fma", 0) * warps * 32 / 128
    alu = sum(cnt.get(c, 0) for c in ALU_CLASSES) * warps * 32 / 64
    issue = sum(cnt.values()) * warps / 4
    epi = max(fma, alu, issue)
    one_d = rec["meta"].get("one_d", False)
    norm_bytes = 16 * 2 if gluon else 4  # per code: bf16 pieces, or one fp32 norm
    l2_bytes = bk * d_eff * ec + (0 if one_d else bn * d_eff * ez) + norm_bytes * bk
    l2_bpc = dev["l2_tbs"] * 1e12 / dev["sms"] / (dev["ghz"] * 1e9)
    mem = l2_bytes / l2_bpc
    b = rec["blocks_per_sm"]
    if gluon:
        t = max((tensor + max(tensor, epi) + epi) / 2, mem)
        bound = "L2" if mem >= t else ("tensor" if tensor >= epi else "epilogue")
    else:
        t = max(tensor, epi, mem) if b >= 2 else max(tensor + epi, mem)
        bound = max((tensor, "tensor"), (epi, "epilogue"), (mem, "L2"))[1]
    return dict(tensor=tensor, fma=fma, alu=alu, issue=issue, epilogue=epi, l2=mem, tile=t,
                blocks_per_sm=b, bound=bound)  # fmt: skip


def candidates(static: dict, arch: int, prefix: str, d: int) -> list[dict]:
    """The default binary and the autotune candidates compiled for (arch, case, D)."""
    out = []
    for r in static["binaries"]:
        names = [r["name"], *r["meta"].get("aliases", [])]
        if (
            r["arch"] == arch
            and r["kernel"] == "search"
            and any(
                nm == f"{prefix} D{d}" or nm.startswith(f"{prefix} D{d} autotune") for nm in names
            )
        ):
            out.append(r)
    return out


def predict(static: dict, device: str, n: int, k: int, d: int, prefix: str, ez: int, ec: int,
            precision: str | None, rec: dict | None = None) -> dict:  # fmt: skip
    """Predicted fused-forward time, cuBLAS GEMM time and their ratio for one problem.

    ``rec``: the binary to predict (default: the launcher's default binary for this case).
    """
    dev = DEVICES[device]
    rec = rec or find(static, dev["arch"], f"{prefix} D{d}")
    bn, bk = rec["meta"]["config"][:2]
    tc = tile_cycles(rec, dev, d, precision, ez, ec)
    row_blocks = math.ceil(n / bn)
    b = max(1, rec["blocks_per_sm"])
    waves = math.ceil(row_blocks / (dev["sms"] * b))
    kernel_s = waves * b * math.ceil(k / bk) * tc["tile"] / (dev["ghz"] * 1e9)
    # around the kernel: scale pass (z, C), scaled copy (C read+write), norms (C), gather (z, z_q)
    extra_bytes = n * d * ez * 3 + k * d * ec * 4
    extra_s = extra_bytes / (dev["hbm_tbs"] * 1e12)
    peak = dev["gemm_bf16_tflops"] if ec == 2 else dev["gemm_tf32_tflops"]
    flops = 2 * n * k * d
    gemm_s = max(flops / (GEMM_EFFICIENCY * peak * 1e12),
                 (n * k * ec + (n + k) * d * ec) / (dev["hbm_tbs"] * 1e12))  # fmt: skip
    fused_s = kernel_s + extra_s
    return dict(device=device, n=n, k=k, d=d, binary=rec["name"], config=rec["meta"]["config"],
                spill_free=not rec["gate"], default=rec["default"],
                fused_ms=fused_s * 1e3, kernel_ms=kernel_s * 1e3, gemm_ms=gemm_s * 1e3,
                ratio_vs_gemm=fused_s / gemm_s, tflops=flops / fused_s / 1e12,
                **{f"tile_{k2}": v for k2, v in tc.items()})  # fmt: skip


def rank(static: dict, device: str, n: int, k: int, d: int, prefix: str, ez: int, ec: int,
         precision: str | None) -> list[dict]:  # fmt: skip
    """Every compiled candidate for this case, fastest predicted first (spilling ones last)."""
    arch = DEVICES[device]["arch"]
    rows = [predict(static, device, n, k, d, prefix, ez, ec, precision, rec=r)
            for r in candidates(static, arch, prefix, d)]  # fmt: skip
    return sorted(rows, key=lambda r: (not r["spill_free"], r["fused_ms"]))


def table(static: dict, devices=("H100", "H200", "A100")) -> list[dict]:
    """The defaults' predictions; on sm_90 also ``calibrated_ms`` (see :func:`calibration`)."""
    factors = calibration(static, MEASURED_H200)["factors"] if any(
        DEVICES[dv]["arch"] == 90 for dv in devices) else {}  # fmt: skip
    rows = []
    for device in devices:
        for label, prefix, ez, ec, prec in PRECISIONS:
            for d in CASES_D:
                for k in CASES_K:
                    try:
                        r = predict(static, device, CASES_N, k, d, prefix, ez, ec, prec)
                    except KeyError:
                        continue
                    best = rank(static, device, CASES_N, k, d, prefix, ez, ec, prec)
                    r["model_best"] = best[0]["config"] if best else None
                    r["model_best_ms"] = best[0]["fused_ms"] if best else None
                    f = factors.get(label) if DEVICES[device]["arch"] == 90 else None
                    r["calibrated_ms"] = r["fused_ms"] * f if f else None
                    rows.append(dict(r, case=label))
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| device | case | D | K | default config | bound | tile cycles (tensor / epilogue / "
           "L2) | predicted fused ms | GEMM ms | fused / GEMM | best spill-free candidate (ms) |",
           "|" + "---|" * 11]  # fmt: skip
    for r in rows:
        best = "-"  # no tile alternatives compiled (the Gluon kernel has one config)
        if r["model_best"]:
            best = f"{','.join(map(str, r['model_best']))} ({r['model_best_ms']:.2f})"
        out.append(
            f"| {r['device']} | {r['case']} | {r['d']} | {r['k']} | "
            f"{','.join(map(str, r['config']))} | {r['tile_bound']} | "
            f"{r['tile_tensor']:.0f} / {r['tile_epilogue']:.0f} / {r['tile_l2']:.0f} | "
            f"{r['fused_ms']:.2f} | {r['gemm_ms']:.2f} | {r['ratio_vs_gemm']:.2f} | {best} |"
        )
    return "\n".join(out)


def compare(static: dict, measured_paths: list[str]) -> list[dict]:
    """Model against a GPU run: each measured (case, config) the static report compiled."""
    by_label = {label: (prefix, ez, ec, prec) for label, prefix, ez, ec, prec in PRECISIONS}
    rows = []
    for path in measured_paths:
        doc = json.loads(Path(path).read_text())
        device = device_key(doc["device"])
        for case in doc["cases"]:
            if case["case"] not in by_label:
                continue
            prefix, ez, ec, prec = by_label[case["case"]]
            arch = DEVICES[device]["arch"]
            cands = {
                tuple(r["meta"]["config"]): r for r in candidates(static, arch, prefix, case["d"])
            }
            for m in case["configs"].values():
                rec = cands.get(tuple(m["config"]))
                if rec is None or "ms" not in m:
                    continue
                p = predict(static, device, case["n"], case["k"], case["d"], prefix, ez, ec, prec,
                            rec=rec)  # fmt: skip
                rows.append(dict(case=case["case"], d=case["d"], k=case["k"], config=m["config"],
                                 run=path, measured_ms=m["ms"], predicted_ms=p["fused_ms"],
                                 bound=p["tile_bound"], spill_free=p["spill_free"],
                                 default=p["default"]))  # fmt: skip
    return rows


# The committed H200 runs the calibration is fitted to (benchmarks/results/gpu-h200-2026-11-26/).
MEASURED_H200 = [
    str(RESULTS / "gpu-h200-2026-11-26" / run / "gpu_configs.json") for run in ("run2", "run1")
]


def calibration(static: dict, measured_paths: list[str]) -> dict:
    """Per precision class (``PRECISIONS`` label), the median of measured / predicted over the
    measured binaries: multiply a prediction by it. The model keeps its structure (tile cycles,
    waves); only its scale moves per class, because its misses are mostly per class (ieee 4x,
    the others 1.2-1.9x, see docs/benchmarks.md). ``loo`` gives each binary's calibrated / measured
    with its own measurement left out of its class's factor (an out-of-sample check); a (case,
    config) measured in two runs counts once, the first run's figure.
    """
    seen, by_class = set(), {}
    for r in compare(static, measured_paths):
        key = (r["case"], r["d"], r["k"], tuple(r["config"]))
        if key not in seen:
            seen.add(key)
            by_class.setdefault(r["case"], []).append(r)

    def median(xs):
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2

    factors, loo = {}, []
    for case, rows in by_class.items():
        ratios = [r["measured_ms"] / r["predicted_ms"] for r in rows]
        factors[case] = median(ratios)
        for i, r in enumerate(rows):
            others = ratios[:i] + ratios[i + 1 :]
            if others:
                f = median(others)
                ratio = r["predicted_ms"] * f / r["measured_ms"]
                loo.append(dict(case=case, d=r["d"], k=r["k"], config=r["config"],
                                default=r["default"], calibrated_over_measured=ratio))  # fmt: skip
    return dict(factors=factors, counts={c: len(v) for c, v in by_class.items()}, loo=loo)


def device_key(name: str) -> str:
    """Map a CUDA device name ("NVIDIA H200", "NVIDIA H100 80GB HBM3") to a DEVICES key."""
    for key in DEVICES:
        if key in name:
            return key
    return "H100"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", action="append", choices=sorted(DEVICES))
    ap.add_argument("--static", help="static report JSON (default: newest in results/)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--measured", nargs="+", help="gpu_configs.json files: model vs measurement")
    ap.add_argument("--calibration", action="store_true",
                    help="per-class factors from the H200 runs, and their check")  # fmt: skip
    a = ap.parse_args(argv)
    static = load_static(a.static)
    if a.calibration:
        cal = calibration(static, MEASURED_H200)
        print("| case | binaries | factor (measured / predicted, median) | leave-one-out "
              "calibrated / measured, all (min - max) | the same, defaults |\n"
              + "|" + "---|" * 5)  # fmt: skip
        for case, f in cal["factors"].items():
            lo = [x for x in cal["loo"] if x["case"] == case]
            span = lambda xs: (  # noqa: E731
                f"{min(xs):.2f} - {max(xs):.2f}" if xs else "-"
            )
            every = span([x["calibrated_over_measured"] for x in lo])
            defaults = ", ".join(
                f"D{x['d']} K{x['k']}: {x['calibrated_over_measured']:.2f}"
                for x in lo if x["default"]
            ) or "-"  # fmt: skip
            print(f"| {case} | {cal['counts'][case]} | {f:.2f} | {every} | {defaults} |")
        return 0
    if a.measured:
        rows = compare(static, a.measured)
        print("| case | D | K | config | measured ms | predicted ms | predicted / measured "
              "| model's bound | spill-free |\n" + "|" + "---|" * 9)  # fmt: skip
        seen = set()
        for r in rows:
            key = (r["case"], r["d"], r["k"], tuple(r["config"]))
            if key in seen:  # the same config measured in both runs: the first is shown
                continue
            seen.add(key)
            print(f"| {r['case']} | {r['d']} | {r['k']} | {','.join(map(str, r['config']))} | "
                  f"{r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
                  f"{r['predicted_ms'] / r['measured_ms']:.2f} | {r['bound']} | "
                  f"{'yes' if r['spill_free'] else 'no'} |")  # fmt: skip
        return 0
    rows = table(static, tuple(a.device or ("H100", "H200", "A100")))
    if a.json:
        print(json.dumps({"static_report": static["date"], "triton": static["triton"],
                          "rows": rows}, indent=1))  # fmt: skip
    else:
        print(f"Static report of {static['date']} (Triton {static['triton']}).\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
