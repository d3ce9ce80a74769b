"""fastvq.sample_codes against the dense cdist + Gumbel + argmax at a tiny size: a
pytest-benchmark pair (one group), and benchmarks/sampling_speed.py's fresh-process protocol for
one tiny round, so that neither can rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvq

ROOT = Path(__file__).resolve().parents[1]
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
    out = tmp_path / "sampling.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.sampling_speed", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| 64 × 300 × 8 |" in run.stdout
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    (rnd,) = row["rounds"]
    assert rnd["fastvq"] > 0 and rnd["dense"] > 0 and rnd["peak_bytes"]["dense"] > 0
    assert out.with_suffix(".md").is_file()
