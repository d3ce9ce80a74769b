"""The CE-commitment and diversity losses, forward + backward, one checkout against another, on CPU.

    git worktree add --detach /tmp/old 203f07a              # the losses' own tiled torch code
    python -m benchmarks.loss_speed --ref /tmp/old --threads 1 --rounds 3
    python -m benchmarks.loss_speed --ref . --smoke         # one tiny round (CI)

Each step is ``fastvq.ce_commitment_loss(z, C, indices)`` (``ce``: indices the nearest codes, as
the layer passes them) or ``fastvq.diversity_loss(z, C)`` (``diversity``: vqp's default
temperature 100), each at its default chunk, then ``backward()`` to both ``z`` and ``C``: the
public API only, so any checkout can be timed. From commit 203f07a back the losses carry their own
tiled torch softmax; after it they run on ``fastvq.soft_assign``'s torch twin.

Protocol, as layer_speed.py's (docs/benchmarks.md): every (side, loss, shape, round) runs in a
fresh process with the same thread count, ``PYTHONPATH`` and working directory set to that side's
checkout (the worker reports the ``fastvq`` file it imported); inputs ``torch.manual_seed(0)``
randn; one warm-up call, then the minimum over at least ``--calls`` calls and ``--min-time``
seconds of calls. Sides alternate, the first side flipping every round. Peak memory: growth of
the RSS high-water mark over the RSS once the inputs were built. The report: every per-round
figure, the per-round ratios old/new (> 1: new faster), their median, peak memory per side and
the load average before each process. JSON and markdown under benchmarks/results/.
"""

from __future__ import annotations

import sys

from ._ab import OldNew, old_new_main
from ._timed_worker import timed_worker

SHAPES = [(4096, 16384, 64), (8192, 65536, 64)]
SMOKE_SHAPES = [(64, 300, 8)]
LOSSES = ("ce", "diversity")

WORKER = timed_worker(r"""
torch.manual_seed(0)
z = torch.randn(n, d, requires_grad=True)
codes = torch.randn(k, d, requires_grad=True)
with torch.no_grad():  # the nearest codes, in row blocks (no N x K matrix here either)
    idx = torch.cat([torch.cdist(b, codes).argmin(1) for b in z.split(256)])
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")

def fn():
    if what == "ce":
        loss = fastvq.ce_commitment_loss(z, codes, idx)
    else:
        loss = fastvq.diversity_loss(z, codes)
    loss.backward()
    z.grad = codes.grad = None
""")


SPEC = OldNew(
    module="loss_speed", description=__doc__.split("\n")[0], worker=WORKER,
    option="losses", field="loss", cases=LOSSES, shapes=SHAPES, smoke_shapes=SMOKE_SHAPES,
    shapes_first=True,
    title="CPU CE-commitment and diversity losses, forward + backward",
    peak_over="once the inputs were built", result="cpu-losses",
)  # fmt: skip


def main(argv=None) -> int:
    """The command (module docstring): ``argv`` as sys.argv[1:]; 0 when done."""
    return old_new_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
