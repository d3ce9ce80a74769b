"""Count a search binary's loop mix for sm_90 as benchmarks/gpu_static.py does (the probes).

    python benchmarks/results/probes-2026-12-07/count.py gluon D
    python benchmarks/results/probes-2026-12-07/count.py triton D BN,BK,BD,WARPS,STAGES

Run from the repository root with TRITON_INTERPRET unset, after applying one probe's patch
(README.md beside this file). Prints the loop mix, registers, spills and the non-MMA
instructions per accumulator element (for the Gluon kernel, the loop's count over 4 tiles).
"""

import sys

from benchmarks import gpu_static as gs


def main(argv: list[str]) -> None:
    kind, d = argv[0], int(argv[1])
    config = tuple(int(x) for x in argv[2].split(",")) if kind == "triton" else None
    b = gs.Binary(f"probe {kind} D{d}", "search_gluon" if kind == "gluon" else "search", 90,
                  kind == "triton", d=d, config=config)  # fmt: skip
    rec = gs.compile_one(b)
    print({k: rec[k] for k in ("regs", "spill_stores", "spill_loads", "loop_per_element")})
    print(rec["loop"])


if __name__ == "__main__":
    main(sys.argv[1:])
