"""Issue 11, item 7: distributed misuse raises a clear error on every rank instead of silently
mixing tensors of different layouts (gloo, 2 processes on CPU, torch backend).

Each scenario runs on both ranks in one process group and must raise the same ValueError on
every rank (so no rank is left waiting in a collective) or, where stated, run without error.
"""

from __future__ import annotations

import pytest
import torch
from dist_scenarios import WORLD, raises, run_scenarios

from fastvq import VectorQuantizer
from fastvq.sharded import ShardedVectorQuantizer, shard_range, sharded_vector_quantize

GLOO_TIMEOUT_S = 30  # a scenario that desynchronises the ranks fails after this, not hangs


def _layer(**kw):
    kw = dict(dict(kmeans_init=False, dead_code_steps=0, backend="torch"), **kw)
    return VectorQuantizer(**kw)


def scenario_layer_different_k_same_stat_size(rank):
    """K=8, D=4 on rank 0 and K=10, D=3 on rank 1: the EMA statistics are (1, 8, 5) and
    (1, 10, 4), 40 numbers each, so the all-reduce alone succeeds and sums garbage."""
    dim, k = (4, 8) if rank == 0 else (3, 10)
    vq = _layer(dim=dim, codebook_size=k)
    msg = raises("codebook_size", lambda: vq(torch.randn(6, dim)))
    assert "[8, 10]" in msg, msg


def scenario_layer_check_sees_first_call_only_without_debug(rank):
    """Same layout everywhere; after the first call rank 1 changes its decay. Without ``debug``
    that goes unseen (documented); with ``debug`` the next training forward raises."""
    for debug in (False, True):
        vq = _layer(dim=4, codebook_size=8, debug=debug)
        vq(torch.randn(5, 4))
        if rank == 1:
            vq.decay = 0.5
        if debug:
            raises("decay", lambda vq=vq: vq(torch.randn(5, 4)))
        else:
            vq(torch.randn(5, 4))


def scenario_layer_kmeans_state_differs(rank):
    """Rank 1 loaded a codebook (no k-means), rank 0 did not: rank 0 would gather k-means rows
    that rank 1 never sends."""
    vq = VectorQuantizer(4, 8, kmeans_iters=2, dead_code_steps=0, backend="torch")
    if rank == 1:
        vq.load_codebook(torch.randn(8, 4))
    raises("kmeans initialised", lambda: vq(torch.randn(20, 4)))


def scenario_layer_consistent_ranks_pass(rank):
    vq = VectorQuantizer(4, 8, kmeans_iters=2, dead_code_steps=1, backend="torch", debug=True)
    for _ in range(3):
        vq(torch.randn(12 + rank, 4))
    vq.eval()
    vq(torch.randn(3, 4))  # eval communicates nothing and checks nothing


def scenario_sharded_different_num_codes(rank):
    """num_codes 10 on rank 0, 12 on rank 1, each with the right local shard: unchecked, rank
    0 got global indices >= 10."""
    k = 10 if rank == 0 else 12
    start, end = shard_range(k, rank, WORLD)
    shard = torch.randn(end - start, 4)
    z = torch.randn(16, 4)
    msg = raises(
        "num_codes", lambda: sharded_vector_quantize(z, shard, num_codes=k, backend="torch")
    )
    assert "[10, 12]" in msg, msg


def scenario_sharded_different_shapes_same_bytes(rank):
    """(3, 4) rows on rank 0, (6, 2) on rank 1: the padded row buffers are 48 bytes each, so
    the byte all-gather succeeds and each rank reads the other's rows in the wrong layout."""
    n, d = (3, 4) if rank == 0 else (6, 2)
    start, end = shard_range(6, rank, WORLD)
    shard = torch.randn(end - start, d)
    z = torch.randn(n, d)
    raises("disagree on D", lambda: sharded_vector_quantize(z, shard, num_codes=6, backend="torch"))


def scenario_sharded_layer_ema_differs(rank):
    """EMA on rank 0 only: rank 0 would all-reduce a total that rank 1 never sends."""
    vq = ShardedVectorQuantizer(4, 10, ema=(rank == 0), backend="torch")
    raises("ema", lambda: vq(torch.randn(5, 4)))


SCENARIOS = [
    scenario_layer_different_k_same_stat_size,
    scenario_layer_check_sees_first_call_only_without_debug,
    scenario_layer_kmeans_state_differs,
    scenario_layer_consistent_ranks_pass,
    scenario_sharded_different_num_codes,
    scenario_sharded_different_shapes_same_bytes,
    scenario_sharded_layer_ema_differs,
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("distcheck")
    return run_scenarios(__name__, SCENARIOS, d, GLOO_TIMEOUT_S, preload=("torch._dynamo",))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [fn.__name__ for fn in SCENARIOS])
def test_distributed_misuse(results, scenario):
    failed = {r: m for r, m in enumerate(results[scenario]) if m != "ok"}
    assert not failed, "\n".join(f"--- rank {r}:\n{m}" for r, m in failed.items())
