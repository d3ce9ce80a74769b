"""On a GPU: time the default search binaries against alternatives and cuBLAS, beside the model.

    OUT=/dir python -m benchmarks.gpu_configs      # run by benchmarks/gpu_check.sh

For N = 65536 and each case (dtype / fp32 precision, D, K) it times, with
``triton.testing.do_bench`` (median of repeated launches after warm-up, CUDA events):
the launcher's default config, the pre-static-gate default and a few spill-free alternatives,
one cuBLAS matmul of the same shape (the yardstick of benchmarks/gpu_model.py), and how many
rows each fp32 precision assigns differently from ieee fp32. The static model's prediction for
the default is stored next to each measurement. Results go to ``$OUT/gpu_configs.json`` after
every case, so a stage killed by its time limit keeps what it measured.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

# Spill-free or not, the shapes the static model weighs against the defaults (see
# docs/benchmarks.md): bigger row blocks (less L2 traffic per MMA), the row tile held across the
# code loop for D = 256 (BLOCK_D = D), and the smaller fp32 tiles.
ALTERNATIVES = {  # (fp32 search?, D) -> configs (BN, BK, BD, warps, stages)
    (False, 64): [(256, 64, 64, 8, 3), (128, 64, 64, 8, 3), (256, 128, 64, 8, 3)],
    (False, 256): [(128, 64, 256, 8, 2), (128, 128, 256, 8, 2), (128, 128, 64, 8, 3)],
    (True, 64): [(128, 64, 32, 8, 3), (64, 64, 64, 4, 3)],
    (True, 256): [(128, 64, 64, 8, 3), (64, 64, 32, 4, 3)],
}


# Cases timed with their default alone (and the Gluon kernel where it applies): (label, D, K).
DEFAULT_ONLY = {("fp16", 256, 16384), ("fp16", 64, 16384), ("bf16", 64, 65536)}

# The name under which the Gluon kernel (kernels/vq_search_sm90.py) is timed where it applies.
GLUON = "gluon sm_90"

# FASTVQ_GPU_CONFIGS_QUICK=1: (case, D) -> the default the first GPU run (2026-11-26) measured
QUICK_CASES = {
    ("bf16", 256): (128, 64, 64, 8, 3),
    ("fp32 tf32x3", 64): (128, 64, 64, 8, 3),
    ("fp32 tf32x3", 256): (128, 64, 32, 8, 3),
    ("fp32 tf32", 64): (128, 64, 64, 8, 3),
    ("autocast mix tf32x3", 256): (128, 64, 32, 8, 3),
    ("fp32 ieee", 64): None,
}


def main() -> int:
    import triton
    import triton.testing

    from benchmarks import gpu_model
    from fastvq import _search_triton as vs

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    out = os.path.join(os.environ.get("OUT", "."), "gpu_configs.json")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    model_dev = gpu_model.device_key(name)
    try:
        static = gpu_model.load_static()
    except FileNotFoundError:
        static = None
    torch.backends.cuda.matmul.allow_tf32 = True  # the yardstick's fp32 GEMM runs in TF32
    doc = {"device": name, "capability": torch.cuda.get_device_capability(dev),
           "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "model_device": model_dev, "cases": []}  # fmt: skip
    n = 65536
    old_fp32 = vs.SearchConfig(128, 64, 32, 4, 3)  # defaults before the static gate (spilled)
    old_16 = {64: vs.SearchConfig(128, 128, 64, 8, 3), 256: vs.SearchConfig(128, 64, 64, 4, 3)}
    cases = [  # (label, model prefix, z dtype, codebook dtype, precision, D, K)
        ("bf16", "bf16", torch.bfloat16, torch.bfloat16, None, 64, 16384),
        ("bf16", "bf16", torch.bfloat16, torch.bfloat16, None, 256, 16384),
        ("bf16", "bf16", torch.bfloat16, torch.bfloat16, None, 256, 65536),
        ("fp32 tf32x3", "fp32 tf32x3", torch.float32, torch.float32, "tf32x3", 64, 16384),
        ("fp32 tf32", "fp32 tf32", torch.float32, torch.float32, "tf32", 64, 16384),
        ("fp32 tf32_rescore", "fp32 tf32_rescore", torch.float32, torch.float32,
         "tf32_rescore", 64, 16384),
        ("fp32 ieee", "fp32 ieee", torch.float32, torch.float32, "ieee", 64, 16384),
        ("fp32 tf32x3", "fp32 tf32x3", torch.float32, torch.float32, "tf32x3", 256, 16384),
        ("fp32 tf32", "fp32 tf32", torch.float32, torch.float32, "tf32", 256, 16384),
        ("fp32 tf32_rescore", "fp32 tf32_rescore", torch.float32, torch.float32,
         "tf32_rescore", 256, 16384),
        ("autocast mix tf32x3", "mix tf32x3", torch.bfloat16, torch.float32, "tf32x3", 256,
         16384),
        ("fp32 ieee", "fp32 ieee", torch.float32, torch.float32, "ieee", 256, 16384),
        # last, the default (and the Gluon kernel) only: fp16, and K = 65536 at D = 64
        ("fp16", "fp16", torch.float16, torch.float16, None, 256, 16384),
        ("fp16", "fp16", torch.float16, torch.float16, None, 64, 16384),
        ("bf16", "bf16", torch.bfloat16, torch.bfloat16, None, 64, 65536),
    ]  # fmt: skip
    quick = os.environ.get("FASTVQ_GPU_CONFIGS_QUICK") == "1"
    if quick:
        # re-check after a defaults change: the changed cases, new default against the
        # default the first run measured (same run, same machine), plus ieee as the reference
        cases = [c for c in cases if (c[0], c[5]) in QUICK_CASES]
    ref_idx = {}
    for label, prefix, zt, ct, prec, d, k in cases:
        # same data for every case of one (D, K): the fp32 precisions are compared row by row
        g = torch.Generator(device=dev).manual_seed(1000003 * d + k)
        z = torch.randn(n, d, device=dev, generator=g).to(zt)
        c = torch.randn(k, d, device=dev, generator=g).to(ct)
        search_t = torch.promote_types(zt, ct)
        default = vs.pick_config(n, k, d, search_t, arch=vs.gpu_arch(dev), precision=prec or "")
        alts = {"default": None, "pre-gate default": old_fp32 if search_t == torch.float32
                else old_16[d]}  # fmt: skip
        if prec == "ieee" or (label, d, k) in DEFAULT_ONLY:
            # the exact reference, not a speed path; or a case added for its default alone
            alts = {"default": None}
        if quick:
            alts = {"default": None}
            if (label, d) in QUICK_CASES and QUICK_CASES[(label, d)]:
                alts["first-run default"] = vs.SearchConfig(*QUICK_CASES[(label, d)])
        extra = []
        if static is not None and len(alts) > 1 and not quick:
            # the static model's two best spill-free candidates, so the run can confirm it
            ez, ec = (
                torch.tensor([], dtype=zt).element_size(),
                torch.tensor([], dtype=ct).element_size(),
            )
            ranked = gpu_model.rank(static, model_dev, n, k, d, prefix, ez, ec, prec)
            extra = [tuple(r["config"]) for r in ranked if r["spill_free"]][:2]
        for cfg in [*ALTERNATIVES[(search_t == torch.float32, d)], *extra] if len(alts) > 1 else ():
            alts["BN{} BK{} BD{} w{} s{}".format(*cfg)] = vs.SearchConfig(*cfg)
        if vs.gluon_applies(vs.gpu_arch(dev), zt, ct, d):
            # the sm_90 default for 16-bit operands, right after the Triton kernel's default
            # config (a stage cut short keeps it)
            alts = {
                "default": None,
                GLUON: GLUON,
                **{a: v for a, v in alts.items() if a != "default"},
            }
        row = {"case": label, "n": n, "k": k, "d": d, "default_config": list(default),
               "z_dtype": str(zt), "configs": {}}  # fmt: skip
        default_idx = None
        for alt, cfg in alts.items():
            if cfg is not None and cfg == default and alt != "default":
                continue
            try:

                def fn(cfg=cfg, z=z, c=c, prec=prec):
                    if cfg == GLUON:
                        return vs.vq_search_triton(z, c, kernel="gluon")
                    # the Triton kernel's rows (on sm_90 "auto" would run the Gluon one)
                    return vs.vq_search_triton(z, c, fp32_precision=prec, config=cfg,
                                               kernel="triton")  # fmt: skip

                idx = fn()[0]
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                used = default if cfg in (None, GLUON) else cfg
                if cfg == GLUON:
                    used = vs.plan_search(
                        n, k, d, zt, ct, arch=90, num_sms=1, kernel="gluon"
                    ).config
                row["configs"][alt] = {"config": list(used), "ms": ms,
                                       "tflops": 2 * n * k * d / ms / 1e9}  # fmt: skip
                if cfg == GLUON and static is not None:
                    try:  # the static model's figure for the Gluon kernel, beside its time
                        gp = gpu_model.predict(
                            static,
                            model_dev,
                            n,
                            k,
                            d,
                            f"gluon {prefix}",
                            z.element_size(),
                            c.element_size(),
                            prec,
                        )
                        row["configs"][alt]["predicted_ms"] = gp["fused_ms"]
                    except KeyError as exc:
                        row["configs"][alt]["predicted_ms"] = str(exc)
                if alt == "default":
                    default_idx = idx
                elif cfg == GLUON and default_idx is not None:
                    # fp32 accumulations in another order: only near-ties may differ
                    row["configs"][alt]["rows_differing_from_default"] = int(
                        (idx != default_idx).sum()
                    )
                if alt == "default" and search_t == torch.float32:
                    key = (d, k, zt)
                    if prec == "ieee":
                        ref_idx[key] = idx
                    row["indices"] = idx
            except Exception as exc:  # recorded: a config that fails to compile is a result
                used = default if cfg in (None, GLUON) else cfg
                row["configs"][alt] = {"config": list(used), "error": repr(exc)[:300]}
        mm_out = torch.empty(n, k, device=dev, dtype=ct)
        cz = z.to(ct)
        ms = triton.testing.do_bench(
            lambda cz=cz, c=c, mm_out=mm_out: torch.matmul(cz, c.T, out=mm_out),
            warmup=10, rep=60, return_mode="median",
        )  # fmt: skip
        row["cublas_matmul_ms"] = ms
        del mm_out
        if static is not None:
            try:
                ez, ec = z.element_size(), c.element_size()
                p = gpu_model.predict(static, model_dev, n, k, d, prefix, ez, ec, prec)
                row["predicted"] = {k2: p[k2] for k2 in ("fused_ms", "gemm_ms", "ratio_vs_gemm",
                                                          "tile_bound")}  # fmt: skip
            except KeyError as exc:
                row["predicted"] = {"error": str(exc)}
        meas = row["configs"].get("default", {}).get("ms")
        if meas:
            row["measured_ratio_vs_cublas"] = meas / row["cublas_matmul_ms"]
        doc["cases"].append(row)
        print(json.dumps({k2: v for k2, v in row.items() if k2 != "indices"}), flush=True)
        _dump(doc, out)
        torch.cuda.empty_cache()
    # fp32 precisions: rows assigned differently from ieee fp32 (same inputs, same seed order)
    for row in doc["cases"]:
        idx = row.pop("indices", None)
        key = (row["d"], row["k"], torch.float32)
        if idx is not None and key in ref_idx and row["z_dtype"] == "torch.float32":
            row["rows_differing_from_ieee"] = int((idx != ref_idx[key]).sum())
    _dump(doc, out)
    return 0


def render(paths: list[str]) -> str:
    """Markdown tables of one or more ``gpu_configs.json`` files (what the results README holds)."""
    out = []
    for path in paths:
        doc = json.load(open(path))
        out += [f"### `{path}`", "",
                f"{doc['device']}, torch {doc['torch']}, Triton {doc['triton']}, {doc['date']}. "
                "Times: median of `triton.testing.do_bench` (CUDA events), N = 65536. "
                "'predicted': the static model for the default binary at the time of the run.",
                "", "| case | D | K | default config | default ms | other configs (ms) | cuBLAS "
                "matmul ms | default / cuBLAS | predicted ms | rows differing from ieee |",
                "|" + "---|" * 10]  # fmt: skip
        for r in doc["cases"]:
            cfgs = r["configs"]
            dflt = cfgs.get("default", {})
            others = "; ".join(
                f"{k} {','.join(map(str, v['config']))}: "
                + (f"{v['ms']:.3f}" if "ms" in v else "error")
                for k, v in sorted(cfgs.items(), key=lambda kv: kv[1].get("ms", 1e9))
                if k != "default"
            )
            pred = r.get("predicted", {}).get("fused_ms")
            pred = f"{pred:.2f}" if pred is not None else "-"
            ratio = r.get("measured_ratio_vs_cublas", float("nan"))
            out.append(
                f"| {r['case']} | {r['d']} | {r['k']} | {','.join(map(str, r['default_config']))}"
                f" | {dflt.get('ms', float('nan')):.3f} | {others or '-'} | "
                f"{r['cublas_matmul_ms']:.3f} | {ratio:.2f} | {pred} | "
                f"{r.get('rows_differing_from_ieee', '-')} |"
            )
        out.append("")
    return "\n".join(out)


def _dump(doc, path):
    clean = {**doc, "cases": [{k: v for k, v in r.items() if k != "indices"} for r in doc["cases"]]}
    with open(path, "w") as f:
        json.dump(clean, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        print(render(sys.argv[2:]))
        sys.exit(0)
    sys.exit(main())
