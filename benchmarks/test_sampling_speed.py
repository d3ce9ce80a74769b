"""fastvq.sample_codes against the dense cdist + Gumbel + argmax at a tiny size: a
pytest-benchmark pair (one group), and benchmarks/sampling_speed.py's fresh-process protocol for
one tiny round, so that neither can rot."""

import pytest
import torch

import fastvq
from benchmarks._smoke import smoke_run

N, K, D = 256, 1024, 64


def _dense(z, codes, gen):
    logits = -torch.cdist(z, codes)
    u = torch.rand(logits.shape, generator=gen).clamp(min=1e-20)
    return (logits + -torch.log(-torch.log(u).clamp(min=1e-20))).argmax(dim=-1)


def _tiled(z, codes, gen):
    return fastvq.sample_codes(z, codes, temperature=1.0, generator=gen)


@pytest.mark.parametrize("side", ["fastvq", "dense"])
def test_sampling(benchmark, side):
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g) * 0.5
    fn = _tiled if side == "fastvq" else _dense
    benchmark.group = f"sample-codes cpu N={N} K={K} D={D} fp32"
    benchmark.extra_info |= {"device": "cpu", "threads": torch.get_num_threads()}
    idx = benchmark.pedantic(fn, args=(z, codes, g), warmup_rounds=1, rounds=5, iterations=1)
    assert idx.shape == (N,) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < K


def test_sampling_speed_smoke(tmp_path):
    stdout, doc = smoke_run(tmp_path, "sampling_speed")
    assert "| 64 × 300 × 8 |" in stdout
    (row,) = doc["rows"]
    (rnd,) = row["rounds"]
    assert rnd["fastvq"] > 0 and rnd["dense"] > 0 and rnd["peak_bytes"]["dense"] > 0
