"""vqp's ``straight_through`` soft path: peak RSS growth and time of one training forward +
backward, vqp against the front end, ``python -m benchmarks.vqp_straight_through_memory IMPL N K``
(IMPL ``vqp`` or ``fastvq``; docs/vqp-examples.md). The input does not require grad and the layer
projects (dim 64, codebook_dim 32), so the soft path carries ``project_in``'s gradient; no EMA
step (vqp's writes the codes in place before its backward reads them); one
thread, one fresh process per figure."""

import sys
import time

import torch

from fastvq._procmem import proc_status_kib, reset_peak_rss

impl, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
if impl == "vqp":
    from vector_quantize_pytorch import VectorQuantize
else:
    from fastvq.compat.vqp import VectorQuantize
torch.manual_seed(0)
vq = VectorQuantize(dim=64, codebook_dim=32, codebook_size=k, straight_through=True,
                    rotation_trick=False, sample_codebook_temp=0.5)  # fmt: skip
x = torch.randn(1, n, 64)
w = torch.randn(1, n, 64)
reset_peak_rss(required=True)
base = proc_status_kib("VmRSS")
t = time.perf_counter()
q, idx, loss = vq(x, ema_update=False)  # vqp's EMA would rewrite the codes its backward reads
t1 = time.perf_counter()
((q * w).sum() + loss).backward()
t2 = time.perf_counter()
growth = (proc_status_kib("VmHWM") - base) / 1024
grad = vq.project_in.weight.grad.norm().item()
print(
    f"impl={impl} N={n} K={k} threads=1 growth={growth:.1f} MiB fwd={t1 - t:.2f}s "
    f"bwd={t2 - t1:.2f}s project_in_grad_norm={grad:.6f}"
)
