"""Sharded codebook: one spawn of R gloo processes runs every multi-process scenario in turn.

Each scenario compares the sharded op/layer on every rank with the unsharded op/layer computed in
the same process on the same data (every process rebuilds all ranks' data from one seed). Spawning
costs seconds (each child imports torch), so all scenarios share one spawn per world size; each
scenario writes ``ok`` or its traceback to a file per rank, and one test per scenario reads them.
A failing rank stops its process; the others then fail their next collective after the gloo
timeout, so a failure is reported in bounded time, never as a hang.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvq
from fastvq.sharded import (
    ShardedVectorQuantizer,
    ddp_ignore_shards,
    gather_codebook,
    init_codes,
    pack_keys,
    shard_range,
    sharded_vector_quantize,
    unpack_keys,
)

GLOO_TIMEOUT_S = 60
BACKEND = "torch"


# --- single-process tests -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 10, 11, 1000, 65537])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_range_partitions_contiguously(k, world):
    ranges = [shard_range(k, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == k
    for (_, e0), (s1, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert e0 == s1
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_keys_order_like_error_then_index():
    err = torch.tensor([0.0, 1e-45, 1e-38, 1.0, 1.0, 3.0e38, float("inf"), float("nan"), -0.0])
    idx = torch.tensor([9, 8, 7, 6, 2, 5, 4, 3, 10])
    keys = pack_keys(err, idx)
    order = keys.argsort().tolist()
    assert order == [0, 8, 1, 2, 4, 3, 5, 6, 7]  # (0, 9) < (-0.0 -> 0, 10): error first, then index
    back_idx, back_err = unpack_keys(keys)
    assert torch.equal(back_idx, idx)
    assert torch.equal(back_err[:7], err[:7]) and back_err[7].isnan()


def test_init_codes_do_not_depend_on_sharding():
    full = init_codes(0, 9000, 5, seed=3)
    parts = [init_codes(*shard_range(9000, r, 4), 5, seed=3) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)


def test_single_process_is_the_unsharded_op():
    z = torch.randn(40, 8, requires_grad=True)
    cb = torch.randn(37, 8, requires_grad=True)
    out = sharded_vector_quantize(z, cb, num_codes=37, backend=BACKEND)
    (out.quantized.square().sum() + out.loss).backward()
    gz, gc = z.grad.clone(), cb.grad.clone()
    z.grad = cb.grad = None
    ref = fastvq.vector_quantize(z, cb, backend=BACKEND)
    (ref.quantized.square().sum() + ref.loss).backward()
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.loss, ref.loss)
    assert torch.equal(gz, z.grad) and torch.equal(gc, cb.grad)


def test_shard_shape_is_checked():
    with pytest.raises(ValueError, match="must hold codes"):
        sharded_vector_quantize(torch.randn(4, 8), torch.randn(5, 8), num_codes=6)
    with pytest.raises(ValueError, match="num_codes"):
        sharded_vector_quantize(torch.randn(4, 8), torch.randn(5, 8), num_codes=0)


# --- multi-process scenarios ----------------------------------------------------------------------


class _Skip(Exception):
    """Raised on every rank before any collective when a scenario cannot run here."""


def _rank_data(world, sizes, d, seed, integer=False, dtype=torch.float32):
    """Every rank's rows, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        if integer:  # small integers: every fp32 distance is exact, so ties are real ties
            z = torch.randint(-3, 4, (sizes[r], d), generator=gen).float()
        else:
            z = torch.randn(sizes[r], d, generator=gen)
        out.append(z.to(dtype))
    return out


def _integer_codebook(k, d, seed, duplicates):
    gen = torch.Generator().manual_seed(seed)
    cb = torch.randint(-2, 3, (k, d), generator=gen).float()
    for dst, src in duplicates:  # bitwise-equal codes on both sides of shard boundaries
        cb[dst] = cb[src]
    return cb


def _check_op(rank, world, *, k, d, sizes, seed, integer, duplicates=(), zdtype=torch.float32):
    """Forward and backward of the sharded op against the unsharded op + DDP's gradient mean."""
    zs = _rank_data(world, sizes, d, seed, integer, zdtype)
    cb = _integer_codebook(k, d, seed + 1, duplicates) if integer else torch.randn(k, d)
    for z in zs:  # rows sitting exactly on a duplicated code: an exact tie between the twins
        for j, (_, src) in enumerate(duplicates[: z.shape[0]]):
            z[j] = cb[src]
    start, end = shard_range(k, rank, world)
    weights = [
        torch.randn(s, d, generator=torch.Generator().manual_seed(seed + 2 + r))
        for r, s in enumerate(sizes)
    ]

    def objective(r, out):  # a different upstream gradient per rank: g_r = r + 1, grad_q = w_r
        return (r + 1) * out.loss + (out.quantized.float() * weights[r]).sum()

    # Reference: the unsharded op on each rank's rows; the codebook gradient DDP would produce.
    ref_cb_grad = torch.zeros(k, d)
    refs = []
    for r in range(world):
        z = zs[r].clone().requires_grad_(True)
        c = cb.clone().requires_grad_(True)
        out = fastvq.vector_quantize(z, c, backend=BACKEND)
        objective(r, out).backward()
        ref_cb_grad += c.grad / world
        refs.append((out, z.grad))

    z = zs[rank].clone().requires_grad_(True)
    shard = cb[start:end].clone().requires_grad_(True)
    out = sharded_vector_quantize(z, shard, num_codes=k, group=None, backend=BACKEND)
    objective(rank, out).backward()
    ref, ref_zgrad = refs[rank]
    bad = (out.indices != ref.indices).nonzero().flatten().tolist()
    assert not bad, f"rank {rank}: rows {bad} differ: {out.indices[bad]} vs {ref.indices[bad]}"
    assert torch.equal(out.quantized, ref.quantized), f"rank {rank}: quantized differ"
    assert out.quantized.dtype == zdtype
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(z.grad, ref_zgrad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shard.grad, ref_cb_grad[start:end], rtol=1e-5, atol=1e-7)
    full = gather_codebook(shard.detach(), k)
    assert torch.equal(full, cb)


def scenario_ties_across_shards(rank, world):
    # K=10 over 3 ranks: shards [0,4) [4,7) [7,10); over 2: [0,5) [5,10). Twins 3/4, 2/5, 6/7/9
    # straddle boundaries in one or both layouts; the lower index must win.
    _check_op(rank, world, k=10, d=4, sizes=[9, 5, 12][:world], seed=0, integer=True,
              duplicates=[(4, 3), (5, 2), (7, 6), (9, 6)])  # fmt: skip


def scenario_random_rows_uneven_sizes(rank, world):
    _check_op(rank, world, k=53, d=8, sizes=[33, 17, 41][:world], seed=10, integer=False)


def scenario_empty_batch_on_one_rank(rank, world):
    _check_op(rank, world, k=11, d=4, sizes=[7, 0, 12][:world], seed=20, integer=True,
              duplicates=[(6, 5)])  # fmt: skip


def scenario_empty_batch_everywhere(rank, world):
    _check_op(rank, world, k=11, d=4, sizes=[0] * world, seed=30, integer=True)


def scenario_fewer_codes_than_ranks(rank, world):
    # K=2 over 3 ranks: the last rank holds no code and must never win.
    _check_op(rank, world, k=world - 1, d=3, sizes=[4, 6, 5][:world], seed=40, integer=False)


def scenario_bf16_rows(rank, world):
    _check_op(rank, world, k=29, d=16, sizes=[20, 13, 8][:world], seed=50, integer=False,
              zdtype=torch.bfloat16)  # fmt: skip


def scenario_nonfinite(rank, world):
    """NaN/Inf rows get index 0 (even when code 0 is NaN); NaN/Inf codes are never picked."""
    k, d = 7, 3
    cb = torch.randn(k, d, generator=torch.Generator().manual_seed(60))
    cb[0, 1] = float("nan")
    cb[shard_range(k, world - 1, world)[0]] = float("inf")  # first code of the last shard
    cb[2, 2] = float("-inf")
    zs = _rank_data(world, [5] * world, d, 61)
    zs[world - 1][1, 0] = float("nan")
    zs[world - 1][3, 2] = float("inf")
    zs[0][2, 1] = float("inf")
    start, end = shard_range(k, rank, world)
    out = sharded_vector_quantize(zs[rank], cb[start:end], num_codes=k, backend=BACKEND)
    ref = fastvq.vector_quantize(zs[rank], cb, backend=BACKEND)
    assert torch.equal(out.indices, ref.indices), (out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=0, equal_nan=True)


def scenario_ema_layer(rank, world):
    """The EMA shard equals ``VectorQuantizer(ema=True)`` fed the concatenated batch (which is
    what the layer's DDP all-reduce of counts and sums computes), step after step."""
    try:
        from fastvq.layer import VectorQuantizer
    except ImportError as exc:
        raise _Skip(f"fastvq.layer not importable: {exc}") from exc

    k, d, sizes = 10, 4, [6, 0, 9][:world]
    cb = torch.randn(k, d, generator=torch.Generator().manual_seed(70))
    ref = VectorQuantizer(d, k, ema=True, kmeans_init=False, dead_code_steps=0,
                          sync_distributed=False, backend=BACKEND)  # fmt: skip
    ref.load_codebook(cb)
    vq = ShardedVectorQuantizer(d, k, ema=True, codebook=cb, backend=BACKEND)
    for step in range(4):
        zs = _rank_data(world, sizes, d, 71 + step)
        z = zs[rank].clone().requires_grad_(True)
        out = vq(z)
        zall = torch.cat(zs).requires_grad_(True)
        rout = ref(zall)
        offset = sum(sizes[:rank])
        assert torch.equal(out.indices, rout.indices[offset : offset + sizes[rank]])
        torch.testing.assert_close(vq.full_codebook(), ref.codebook[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            vq.cluster_size, ref.cluster_size[0, vq.start : vq.end], rtol=1e-6, atol=1e-7
        )
        out.loss.backward()  # commitment only: beta * mean((z - sg(z_q))^2) over this rank's rows
        zr = zall[offset : offset + sizes[rank]].detach().requires_grad_(True)
        (ref.beta * (zr - rout.quantized.detach()[offset : offset + sizes[rank]]).square().mean()
         if sizes[rank] else zr.sum() * 0).backward()  # fmt: skip
        torch.testing.assert_close(z.grad, zr.grad, rtol=1e-6, atol=1e-7)


def scenario_layer_init_and_restart_equal_unsharded(rank, world):
    """k-means init (on every rank's rows) and a dead-code restart give the sharded layer codes
    bit-identical to ``VectorQuantizer`` under DDP fed the same per-rank rows, K % R != 0.

    Gradient codebooks change only by init and restart in a forward, so the whole codebook is
    compared bitwise after each step; an EMA step follows init in the same forward and its
    sums add in another order (close), but its restarted codes are bitwise equal."""
    try:
        from fastvq.layer import VectorQuantizer
    except ImportError as exc:
        raise _Skip(f"fastvq.layer not importable: {exc}") from exc

    k, d, sizes = 11, 4, [13, 5, 9][:world]
    modes = [dict(ema=False), dict(ema=False, cosine=True, codebook_dim=3),
             dict(ema=True), dict(ema=True, cosine=True, codebook_dim=3)]  # fmt: skip
    for kw in modes:
        common = dict(kmeans_init=True, kmeans_iters=3, dead_code_steps=1, seed=5,
                      backend=BACKEND, **kw)  # fmt: skip
        torch.manual_seed(90)  # the same projections on every rank
        ref = VectorQuantizer(d, k, **common)
        vq = ShardedVectorQuantizer(d, k, **common)
        if kw.get("codebook_dim"):
            vq.project_in.load_state_dict(ref.project_in.state_dict())
            vq.project_out.load_state_dict(ref.project_out.state_dict())
        for step in range(3):
            # rows around 3 new centres per step: after init, most codes go unused and restart
            gen = torch.Generator().manual_seed(91 + step)
            centres = 3 * torch.randn(3, d, generator=gen)
            zs = [
                centres[torch.randint(3, (s,), generator=gen)]
                + 0.1 * torch.randn(s, d, generator=gen)
                for s in sizes
            ]
            rout = ref(zs[rank], return_stats=True)
            out = vq(zs[rank].clone().requires_grad_(True))
            assert torch.equal(out.indices, rout.indices), f"{kw} step {step}"
            full, want = vq.full_codebook(), ref.codebook.detach()[0]
            restarted = rout.stats.counts[0] == 0  # dead_code_steps=1: every code unused now
            assert step == 0 or restarted.any(), "no code was restarted"
            if kw["ema"]:  # the EMA step after init differs by the order of the sums
                torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6)
                assert torch.equal(full[restarted], want[restarted]), f"{kw} step {step}"
            else:  # k-means init (step 0) and restarts only: bitwise
                assert torch.equal(full, want), f"{kw} step {step}"
            torch.testing.assert_close(out.loss, rout.loss, rtol=1e-6, atol=1e-7)
            s0, s1 = vq.start, vq.end
            assert torch.equal(vq.steps_unused, ref.steps_unused[0, s0:s1])
            assert torch.equal(vq.usage_counts, ref.usage_counts[0, s0:s1])
            (out.quantized.sum() + out.loss).backward()  # the sharded backward runs everywhere


class _TinyModel(torch.nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.enc = torch.nn.Linear(6, 4)
        self.vq = vq
        self.dec = torch.nn.Linear(4, 6)

    def forward(self, x):
        q, idx, vq_loss = self.vq(self.enc(x))
        return torch.nn.functional.mse_loss(self.dec(q), x) + vq_loss, idx


class _UnshardedVQ(torch.nn.Module):
    def __init__(self, cb):
        super().__init__()
        self.codebook = torch.nn.Parameter(cb.clone())

    def forward(self, z):
        return fastvq.vector_quantize(z, self.codebook, backend=BACKEND)


def scenario_ddp_training(rank, world):
    """DDP + sharded gradient codebook == one process training on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel

    k, n, steps = 10, 8, 4
    torch.manual_seed(80)
    cb = torch.randn(k, 4)
    model = _TinyModel(ShardedVectorQuantizer(4, k, codebook=cb, backend=BACKEND))
    ref = _TinyModel(_UnshardedVQ(cb))
    ref.enc.load_state_dict(model.enc.state_dict())
    ref.dec.load_state_dict(model.dec.state_dict())
    ignored = ddp_ignore_shards(model)
    assert ignored[0] == "vq.book.codebook"  # the names DDP sees
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(steps):
        xs = _rank_data(world, [n] * world, 6, 81 + step)
        opt.zero_grad()
        loss, idx = ddp(xs[rank])
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss, ref_idx = ref(torch.cat(xs))  # equal per-rank batches: mean == mean of means
        ref_loss.backward()
        ref_opt.step()
        assert torch.equal(idx, ref_idx[rank * n : (rank + 1) * n]), f"step {step}"
    for name, p in ref.named_parameters():
        if name != "vq.codebook":
            torch.testing.assert_close(
                dict(model.named_parameters())[name], p, rtol=1e-5, atol=1e-6
            )
    torch.testing.assert_close(
        model.vq.full_codebook(), ref.vq.codebook.detach(), rtol=1e-5, atol=1e-6
    )


SCENARIOS = [
    scenario_ties_across_shards,
    scenario_random_rows_uneven_sizes,
    scenario_empty_batch_on_one_rank,
    scenario_empty_batch_everywhere,
    scenario_fewer_codes_than_ranks,
    scenario_bf16_rows,
    scenario_nonfinite,
    scenario_ema_layer,
    scenario_layer_init_and_restart_equal_unsharded,
    scenario_ddp_training,
]


def _worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )  # fmt: skip
    try:
        for fn in SCENARIOS:
            path = os.path.join(out_dir, f"{fn.__name__}.{rank}")
            try:
                torch.manual_seed(0)
                fn(rank, world)
            except _Skip as exc:
                with open(path, "w") as f:
                    f.write(f"skip: {exc}")
                continue
            except BaseException:
                with open(path, "w") as f:
                    f.write(traceback.format_exc())
                os._exit(1)  # the others fail their next collective after GLOO_TIMEOUT_S
            with open(path, "w") as f:
                f.write("ok")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world: {scenario: [message per rank]}} after one start of R processes per world size.

    The forkserver start method imports torch and this module once, in the server, and forks
    fresh single-threaded children from it: a spawn would re-import torch in every child (~10 s
    each on a 2-core CI machine).
    """
    # torch._dynamo: the custom ops' first call imports it (~5 s), once per process otherwise.
    mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "fastvq", __name__])
    out = {}
    for world in (3, 2):
        d = tmp_path_factory.mktemp(f"sharded{world}")
        try:
            mp.start_processes(
                _worker, args=(world, str(d / "store"), str(d)), nprocs=world, join=True,
                start_method="forkserver",
            )  # fmt: skip
        except Exception:  # the per-scenario files say which scenario failed
            pass
        out[world] = {
            fn.__name__: [
                (d / f"{fn.__name__}.{r}").read_text() if (d / f"{fn.__name__}.{r}").exists()
                else "not run (an earlier scenario failed or a process died)"
                for r in range(world)
            ]
            for fn in SCENARIOS
        }  # fmt: skip
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [3, 2])
@pytest.mark.parametrize("scenario", [fn.__name__ for fn in SCENARIOS])
def test_multiprocess(results, world, scenario):
    msgs = results[world][scenario]
    if all(m.startswith("skip: ") for m in msgs):
        pytest.skip(msgs[0][len("skip: ") :])
    failed = {r: m for r, m in enumerate(msgs) if m != "ok"}
    assert not failed, "\n".join(f"--- rank {r}:\n{m}" for r, m in failed.items())
