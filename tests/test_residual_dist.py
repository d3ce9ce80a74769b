"""Reliability, round 3 (library), item 4: the residual stacks' options that change the sequence
of collectives (quantize dropout's cutoff and rounding, depths, a shared codebook, beams, groups)
are checked across ranks on the first training forward: a ValueError on every rank, not a hang
until the process group's timeout (gloo, 2 processes on CPU, torch backend)."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvq import GroupedResidualVQ, ResidualVQ

WORLD = 2
GLOO_TIMEOUT_S = 10  # a scenario that desynchronises the ranks fails after this, not hangs
PLAIN = dict(kmeans_init=False, dead_code_steps=0, backend="torch")


def _raises(match: str, fn):
    try:
        fn()
    except ValueError as exc:
        if match not in str(exc):
            raise AssertionError(f"ValueError without {match!r}: {exc}") from exc
        return str(exc)
    raise AssertionError(f"no ValueError mentioning {match!r}")


def _steps(m, n=6, dim=4):
    for _ in range(n):
        m(torch.randn(6, dim))


def scenario_cutoff_differs(rank):
    """The issue's case: quantize_dropout_cutoff_index 0 on rank 0, 2 on rank 1."""
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, quantize_dropout_cutoff_index=2 * rank, **PLAIN)
    msg = _raises("quantize_dropout_cutoff_index", lambda: _steps(m))
    assert "[0, 2]" in msg, msg


def scenario_multiple_of_differs(rank):
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, quantize_dropout_multiple_of=1 + rank, **PLAIN)
    _raises("quantize_dropout_multiple_of", lambda: _steps(m))


def scenario_dropout_on_one_rank(rank):
    m = ResidualVQ(4, 8, 3, quantize_dropout=rank == 1, **PLAIN)
    _raises("quantize_dropout", lambda: _steps(m))


def scenario_shared_codebook_differs(rank):
    m = ResidualVQ(4, 8, 3, shared_codebook=rank == 1, **PLAIN)
    _raises("shared_codebook", lambda: _steps(m))


def scenario_beam_size_differs(rank):
    m = ResidualVQ(4, 8, 3, beam_size=1 + 2 * rank, **PLAIN)
    _raises("beam_size", lambda: _steps(m))


def scenario_call_num_active_differs(rank):
    m = ResidualVQ(4, 8, 3, **PLAIN)
    _raises("call_num_active", lambda: m(torch.randn(6, 4), num_active=2 + rank))


def scenario_grouped_cutoff_differs(rank):
    m = GroupedResidualVQ(
        4, 8, 4, groups=2, quantize_dropout=True, quantize_dropout_cutoff_index=2 * rank, **PLAIN
    )
    _raises("quantize_dropout_cutoff_index", lambda: _steps(m))


def scenario_grouped_groups_differ(rank):
    m = GroupedResidualVQ(4, 8, 2, groups=1 + rank, **PLAIN)
    _raises("groups", lambda: _steps(m))


def scenario_debug_sees_a_later_change(rank):
    """With the layers' ``debug`` every training forward checks: a cutoff changed on one rank
    after the first call raises on the next."""
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, debug=True, **PLAIN)
    _steps(m, 2)
    if rank == 1:
        m.quantize_dropout_cutoff_index = 2
    _raises("quantize_dropout_cutoff_index", lambda: _steps(m, 1))


def scenario_consistent_ranks_pass(rank):
    """Same options everywhere (different data, different global RNG): every route trains, with
    the check on every call, and the ranks draw the same depths."""
    torch.manual_seed(100 + rank)
    for kw in (
        dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
        dict(shared_codebook=True, quantize_dropout=True),
        dict(beam_size=2, quantize_dropout=True),
    ):
        m = ResidualVQ(4, 8, 3, debug=True, dead_code_steps=2, backend="torch", **kw)
        kept = []
        for _ in range(5):
            kept.append(int((m(torch.randn(7 + rank, 4)).indices[0] >= 0).sum()))
        every = [None] * WORLD
        dist.all_gather_object(every, kept)
        assert every[0] == every[1], every
    g = GroupedResidualVQ(4, 8, 3, groups=2, quantize_dropout=True, debug=True, **PLAIN)
    _steps(g, 4)
    g.eval()
    g(torch.randn(3, 4))


SCENARIOS = [
    scenario_cutoff_differs,
    scenario_multiple_of_differs,
    scenario_dropout_on_one_rank,
    scenario_shared_codebook_differs,
    scenario_beam_size_differs,
    scenario_call_num_active_differs,
    scenario_grouped_cutoff_differs,
    scenario_grouped_groups_differ,
    scenario_debug_sees_a_later_change,
    scenario_consistent_ranks_pass,
]


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )  # fmt: skip
    try:
        for fn in SCENARIOS:
            torch.manual_seed(0)
            try:
                fn(rank)
                msg = "ok"
            except BaseException:
                msg = traceback.format_exc()
            with open(os.path.join(out_dir, f"{fn.__name__}.{rank}"), "w") as f:
                f.write(msg)
            if msg != "ok":
                os._exit(1)  # the ranks may be out of step now: stop rather than hang
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    mp.set_forkserver_preload(["torch", "torch.distributed", "fastvq", __name__])
    d = tmp_path_factory.mktemp("rvqdist")
    try:
        mp.start_processes(
            _worker, args=(str(d / "store"), str(d)), nprocs=WORLD, join=True,
            start_method="forkserver",
        )  # fmt: skip
    except Exception:  # the per-scenario files say which scenario failed
        pass
    return {
        fn.__name__: [
            (d / f"{fn.__name__}.{r}").read_text() if (d / f"{fn.__name__}.{r}").exists()
            else "not run (an earlier scenario failed or a process died)"
            for r in range(WORLD)
        ]
        for fn in SCENARIOS
    }  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [fn.__name__ for fn in SCENARIOS])
def test_residual_ranks_disagree(results, scenario):
    failed = {r: m for r, m in enumerate(results[scenario]) if m != "ok"}
    assert not failed, "\n".join(f"--- rank {r}:\n{m}" for r, m in failed.items())
