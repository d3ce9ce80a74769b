"""soft_assign memory and time: peak RSS growth of one forward + backward of every output
(lse, E_p[x], p @ C, column sums) on the torch backend at one thread,
``python -m benchmarks.soft_assign_memory N K D [SIMILARITY]`` (the issue's case:
16384 262144 64; results in benchmarks/results/soft-assign-memory-2026-12-07.md)."""

import sys
import time

import torch

import fastvq
from fastvq._procmem import proc_status_kib, reset_peak_rss

n, k, d = (int(a) for a in sys.argv[1:4])
sim = sys.argv[4] if len(sys.argv) > 4 else "dot"
torch.set_num_threads(1)
torch.manual_seed(0)
z = torch.randn(n, d, requires_grad=True)
codes = (torch.randn(k, d) / d**0.5).requires_grad_()
g_lse, g_e, g_q, g_col = torch.randn(n), torch.randn(n), torch.randn(n, d), torch.randn(k)
fastvq.soft_assign(z[:4], codes[:8], similarity=sim, backend="torch")  # first-call allocations
reset_peak_rss(required=True)
base = proc_status_kib("VmRSS")
t0 = time.perf_counter()
out = fastvq.soft_assign(z, codes, similarity=sim, backend="torch")
t1 = time.perf_counter()
loss = (out.lse * g_lse).sum() + (out.expected_logit * g_e).sum()
loss = loss + (out.expected_code * g_q).sum() + (out.column_sums * g_col).sum()
loss.backward()
t2 = time.perf_counter()
growth = (proc_status_kib("VmHWM") - base) / 1024
nxk = n * k * 4 / 2**20
print(
    f"N={n} K={k} D={d} sim={sim} threads={torch.get_num_threads()} growth={growth:.1f} MiB "
    f"(one N x K fp32 matrix: {nxk:.0f} MiB) fwd={t1 - t0:.2f}s bwd={t2 - t1:.2f}s"
)
