"""VectorQuantizer training step (forward + backward), one checkout against another, on CPU.

    git worktree add /tmp/old c49eadf                           # the code before a change
    python -m benchmarks.layer_speed --ref /tmp/old             # this checkout vs /tmp/old
    python -m benchmarks.layer_speed --ref /tmp/old --new /other/checkout
    python -m benchmarks.layer_speed --ref . --smoke            # one tiny round (CI)

``benchmarks/cpu_faiss.py --op fwdbwd`` times the op (``fastvq.vector_quantize``) and ``--op ema``
one EMA layer setup at fixed defaults, without memory; this times the layer, public API only,
for both kinds of codebook:

- ``ema``: ``VectorQuantizer(D, K, kmeans_init=False)`` (EMA codebook, dead-code restart at its
  default), a training forward (search, EMA update, restart bookkeeping) and the backward of
  ``mean(quantized^2) + loss`` to ``x``;
- ``grad``: ``VectorQuantizer(D, K, ema=False, kmeans_init=False)``, the same forward and backward,
  the codebook gradient included (grads dropped after each call, no optimizer step).

Protocol, as cpu_faiss.py's: every (side, step, shape, round) runs in a fresh process with the same
thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``), ``PYTHONPATH`` and working directory
set to that side's checkout (the worker reports the ``fastvq`` file it imported); inputs are
``torch.manual_seed(0)`` randn; one warm-up call, then the minimum over at least ``--calls`` calls
and ``--min-time`` seconds of calls. Sides alternate, the first side flipping every round.
Peak memory: growth of the RSS high-water mark (``VmHWM``, glibc's mmap threshold fixed at
128 KiB) over the RSS before the layer and input were built, through the warm-up and timed calls.
The report: every per-round figure, the per-round ratios old/new (> 1: new faster), their median,
peak memory per side and the load average before each process. JSON and markdown under
benchmarks/results/.
"""

from __future__ import annotations

import sys

from ._ab import OldNew, old_new_main
from ._timed_worker import timed_worker

SHAPES = [(16384, 8192, 64), (256, 1024, 64)]
SMOKE_SHAPES = [(256, 128, 16)]
STEPS = ("ema", "grad")

WORKER = timed_worker(r"""
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")
torch.manual_seed(0)
layer = fastvq.VectorQuantizer(d, k, ema=what == "ema", kmeans_init=False, backend="torch")
layer.train()
x = torch.randn(n, d, requires_grad=True)
params = list(layer.parameters())

def fn():
    out = layer(x)
    (out.quantized.square().mean() + out.loss).backward()
    x.grad = None
    for p in params:
        p.grad = None
""")


SPEC = OldNew(
    module="layer_speed", description=__doc__.split("\n")[0], worker=WORKER,
    option="steps", field="step", cases=STEPS, shapes=SHAPES, smoke_shapes=SMOKE_SHAPES,
    shapes_first=False, title="CPU VectorQuantizer training step",
    peak_over="before the layer and input were built", result="cpu-layer-step",
    unit=("ms", 1e3, 1), timeout=1800,
)  # fmt: skip


def main(argv=None) -> int:
    """The command (module docstring): ``argv`` as sys.argv[1:]; 0 when done."""
    return old_new_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
