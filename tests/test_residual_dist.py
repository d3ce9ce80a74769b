"""Reliability, round 3 (library), item 4: the residual stacks' options that change the sequence
of collectives (quantize dropout's cutoff and rounding, depths, a shared codebook, beams, groups)
are checked across ranks on the first training forward: a ValueError on every rank, not a hang
until the process group's timeout (gloo, 2 processes on CPU, torch backend)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_scenarios import WORLD, raises, run_scenarios

from fastvq import GroupedResidualVQ, ResidualVQ

GLOO_TIMEOUT_S = 10  # a scenario that desynchronises the ranks fails after this, not hangs
PLAIN = dict(kmeans_init=False, dead_code_steps=0, backend="torch")


def _steps(m, n=6, dim=4):
    for _ in range(n):
        m(torch.randn(6, dim))


def scenario_cutoff_differs(rank):
    """The issue's case: quantize_dropout_cutoff_index 0 on rank 0, 2 on rank 1."""
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, quantize_dropout_cutoff_index=2 * rank, **PLAIN)
    msg = raises("quantize_dropout_cutoff_index", lambda: _steps(m))
    assert "[0, 2]" in msg, msg


def scenario_multiple_of_differs(rank):
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, quantize_dropout_multiple_of=1 + rank, **PLAIN)
    raises("quantize_dropout_multiple_of", lambda: _steps(m))


def scenario_dropout_on_one_rank(rank):
    m = ResidualVQ(4, 8, 3, quantize_dropout=rank == 1, **PLAIN)
    raises("quantize_dropout", lambda: _steps(m))


def scenario_shared_codebook_differs(rank):
    m = ResidualVQ(4, 8, 3, shared_codebook=rank == 1, **PLAIN)
    raises("shared_codebook", lambda: _steps(m))


def scenario_beam_size_differs(rank):
    m = ResidualVQ(4, 8, 3, beam_size=1 + 2 * rank, **PLAIN)
    raises("beam_size", lambda: _steps(m))


def scenario_call_num_active_differs(rank):
    m = ResidualVQ(4, 8, 3, **PLAIN)
    raises("call_num_active", lambda: m(torch.randn(6, 4), num_active=2 + rank))


def scenario_grouped_cutoff_differs(rank):
    m = GroupedResidualVQ(
        4, 8, 4, groups=2, quantize_dropout=True, quantize_dropout_cutoff_index=2 * rank, **PLAIN
    )
    raises("quantize_dropout_cutoff_index", lambda: _steps(m))


def scenario_grouped_groups_differ(rank):
    m = GroupedResidualVQ(4, 8, 2, groups=1 + rank, **PLAIN)
    raises("groups", lambda: _steps(m))


def scenario_debug_sees_a_later_change(rank):
    """With the layers' ``debug`` every training forward checks: a cutoff changed on one rank
    after the first call raises on the next."""
    m = ResidualVQ(4, 8, 4, quantize_dropout=True, debug=True, **PLAIN)
    _steps(m, 2)
    if rank == 1:
        m.quantize_dropout_cutoff_index = 2
    raises("quantize_dropout_cutoff_index", lambda: _steps(m, 1))


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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("rvqdist")
    return run_scenarios(__name__, SCENARIOS, d, GLOO_TIMEOUT_S, preload=())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [fn.__name__ for fn in SCENARIOS])
def test_residual_ranks_disagree(results, scenario):
    failed = {r: m for r, m in enumerate(results[scenario]) if m != "ok"}
    assert not failed, "\n".join(f"--- rank {r}:\n{m}" for r, m in failed.items())
