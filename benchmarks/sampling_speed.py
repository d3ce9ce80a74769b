"""Stochastic code sampling on CPU: ``fastvq.sample_codes`` against the dense reference.

    python -m benchmarks.sampling_speed                  # 5 rounds, 1 thread, the default shapes
    python -m benchmarks.sampling_speed --smoke          # one tiny round (CI)
    python -m benchmarks.sampling_speed --sides layer-sampled,layer --shapes 16384,65536,64

The dense side is what vqp's ``stochastic_sample_codes`` does in plain torch: the full N x K
``-torch.cdist(z, codes)``, Gumbel noise ``-log(-log(uniform.clamp(1e-20)).clamp(1e-20))`` on the
whole matrix, then ``argmax(logits / t + noise)``. The fastvq side is
``fastvq.sample_codes(z, codes, temperature=t, generator=...)`` (tiled, no N x K tensor); both at
``t = 1``, inputs ``torch.manual_seed(0)`` randn (codes times 0.5). Two more sides time the
layer: ``layer`` is one training step (forward + backward of ``mean(quantized^2) + loss``) of
``VectorQuantizer(D, K, kmeans_init=False)``, ``layer-sampled`` the same with
``stochastic_sample_codes=True`` (issue 26's comparison).

Protocol (docs/benchmarks.md): every (side, shape, round) runs in a fresh process with the same
thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``) and this checkout's ``fastvq``
first on ``PYTHONPATH``; one warm-up call, then the minimum over at least ``--calls`` calls and
``--min-time`` seconds of calls. The sides alternate, the first one flipping every round. Peak
memory: growth of the RSS high-water mark (``VmHWM``, glibc's mmap threshold fixed at 128 KiB)
over the RSS after the inputs were built, through the warm-up and timed calls. The report: every
per-round figure, the per-round ratios second side / first side (default dense / fastvq: > 1,
fastvq faster), their median, the
median peak per side and the load average before each process. JSON and markdown under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys

from ._ab import (
    ROOT,
    ab_markdown,
    ab_rows,
    add_output_args,
    finish,
    ratio_stats,
    run_worker,
    smoke_protocol,
)  # fmt: skip
from ._stamp import add_protocol_args, git_commit, result_header
from ._timed_worker import timed_worker

SHAPES = [(4100, 16384, 64), (4100, 16384, 256), (16384, 16384, 64)]
SMOKE_SHAPES = [(64, 300, 8)]
SIDES = ("fastvq", "dense")
ALL_SIDES = (*SIDES, "layer", "layer-sampled")

WORKER = timed_worker(r"""
torch.manual_seed(0)
z = torch.randn(n, d)
codes = torch.randn(k, d) * 0.5
gen = torch.Generator().manual_seed(1)

def dense():
    logits = -torch.cdist(z, codes)
    noise = -torch.log(-torch.log(torch.rand(logits.shape).clamp(min=1e-20)).clamp(min=1e-20))
    return (logits / 1.0 + noise).argmax(dim=-1)

def tiled():
    return fastvq.sample_codes(z, codes, temperature=1.0, generator=gen)

def layer_step(sampled):
    layer = fastvq.VectorQuantizer(d, k, kmeans_init=False, stochastic_sample_codes=sampled)
    x = torch.randn(n, d, requires_grad=True)

    def step():
        out = layer(x)
        (out.quantized.square().mean() + out.loss).backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step

fns = {"fastvq": lambda: tiled, "dense": lambda: dense,
       "layer": lambda: layer_step(False), "layer-sampled": lambda: layer_step(True)}
fn = fns[what]()
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")
""")


def measure(shapes, rounds, threads, calls, min_time, sides=SIDES) -> list[dict]:
    """One row per shape: per-round seconds and peaks of both sides, ratios second / first."""
    run = lambda s, shape, what: run_worker(  # noqa: E731
        WORKER, ROOT, shape, s, threads, calls, min_time
    )

    def row(what, shape, per_round):
        ratios, median, peaks = ratio_stats(per_round, sides, sides[1], sides[0])
        return {"n": shape[0], "k": shape[1], "d": shape[2], "rounds": per_round,
                "sides": sides, "ratios": ratios, "ratio": f"{sides[1]} / {sides[0]}",
                "median_ratio": median, "median_peak_bytes": peaks}  # fmt: skip

    return ab_rows(sides, [("", s) for s in shapes], rounds, run, row)


def markdown(doc: dict) -> str:
    """The result's Markdown table, one line per shape."""
    a, b = doc["sides"]
    return ab_markdown(
        doc, f"# CPU stochastic sampling ({doc['commit']}): {a} vs {b}, {doc['threads']} thread(s)",
        (a, b), "after the inputs were built", unit=("s", 1.0, 3), mib_digits=1,
        calls_word="call(s)", ratios_key="ratios", median_key="median_ratio",
    )  # fmt: skip


def main(argv=None) -> int:
    """The command (module docstring): ``argv`` as sys.argv[1:]; 0 when done."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_args(ap)
    # one call of the dense side at 16384 x 16384 takes tens of seconds: one timed call each
    ap.set_defaults(threads=1, calls=1, min_time=0.0)
    ap.add_argument("--shapes", help="N,K,D;N,K,D... (default 4100,16384,64;4100,16384,256;"
                    "16384,16384,64)")  # fmt: skip
    ap.add_argument("--sides", default=",".join(SIDES), help=f"two of {ALL_SIDES}")
    add_output_args(ap)
    a = ap.parse_args(argv)
    sides = tuple(a.sides.split(","))
    if len(sides) != 2 or len(set(sides)) != 2 or any(x not in ALL_SIDES for x in sides):
        ap.error(f"--sides must be two different sides of {ALL_SIDES}, got {a.sides}")
    shapes, rounds, calls, min_time = smoke_protocol(a, SHAPES, SMOKE_SHAPES)
    now, doc = result_header("sampling_speed", argv, a.threads, calls, min_time)
    doc |= {"commit": git_commit(ROOT) or "unknown", "sides": sides}
    doc["rows"] = measure(shapes, rounds, a.threads, calls, min_time, sides)
    tag = "" if sides == SIDES else "-" + "-vs-".join(sides)
    name = lambda date: f"cpu-sampling{tag}-{date}-{doc['commit']}-threads{a.threads}.json"  # noqa: E731
    finish(doc, markdown(doc), a, now, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
