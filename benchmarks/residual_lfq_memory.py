"""Residual LFQ memory and time, vqp's stack against fastvq's front end: peak RSS growth of one
training forward + backward (every depth's entropy loss on, default weights), one thread,
``python -m benchmarks.residual_lfq_memory {vqp,fastvq} BITS DEPTHS N`` (docs/lfq.md).

Each implementation runs in its own process (run them alternately, several rounds): a warm-up
call on 8 rows, then the peak RSS is reset (``fastvq._procmem``) and the call on ``N`` rows of
``BITS`` channels (no projection) is measured.
"""

import sys
import time

import torch


def main() -> None:
    impl, bits, depths, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    if impl == "vqp":
        import vector_quantize_pytorch as lib
    else:
        import fastvq.compat.vqp as lib
    from fastvq._procmem import proc_status_kib, reset_peak_rss

    torch.manual_seed(0)
    q = lib.ResidualLFQ(dim=bits, codebook_size=2**bits, num_quantizers=depths)
    warm = torch.randn(1, 8, bits, requires_grad=True)
    out, _, losses = q(warm)
    (out.square().mean() + losses.sum()).backward()
    x = torch.randn(1, n, bits, requires_grad=True)
    reset_peak_rss(required=True)
    base = proc_status_kib("VmRSS")
    t = time.perf_counter()
    out, _, losses = q(x)
    t1 = time.perf_counter()
    (out.square().mean() + losses.sum()).backward()
    t2 = time.perf_counter()
    growth = (proc_status_kib("VmHWM") - base) / 1024
    print(
        f"{impl} K=2^{bits} Q={depths} N={n} threads=1 growth={growth:.1f} MiB "
        f"fwd={t1 - t:.3f}s bwd={t2 - t1:.3f}s loss={losses.sum().item():.5f}"
    )


if __name__ == "__main__":
    main()
