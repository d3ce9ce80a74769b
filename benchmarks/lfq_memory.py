"""LFQ memory and time: peak RSS growth of one training forward + backward with the entropy loss,
``python -m benchmarks.lfq_memory BITS N`` (docs/lfq.md: 18 4096)."""

import sys
import time

import torch

import fastvq
from fastvq._procmem import proc_status_kib, reset_peak_rss

k, n = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
q = fastvq.LFQ(codebook_size=2**k)
x = torch.randn(n, k, requires_grad=True)
reset_peak_rss(required=True)
base = proc_status_kib("VmRSS")
t = time.perf_counter()
out = q(x)
t1 = time.perf_counter()
(out.quantized.square().mean() + out.loss).backward()
t2 = time.perf_counter()
growth = (proc_status_kib("VmHWM") - base) / 1024
print(
    f"K=2^{k} N={n} threads={torch.get_num_threads()} growth={growth:.1f} MiB "
    f"fwd={t1 - t:.2f}s bwd={t2 - t1:.2f}s loss={out.loss.item():.4f}"
)
