"""The sm_90 Gluon search's algorithm, checked on CPU through its interpretable Triton twin.

kernels/vq_search_sm90_twin.py runs the Gluon kernel's steps under ``TRITON_INTERPRET`` (the
launcher takes it when ``FASTVQ_SEARCH_KERNEL=gluon`` and no GPU is present). Small-integer
inputs make every score exact in fp32, so the twin must equal the fp64 oracle row for row,
ties included (lowest index); Gaussian inputs must agree with the torch backend away from
near-ties. tests/test_cuda.py compares the Gluon kernel itself with the Triton kernel on sm_90.
"""

import pytest
import torch
from test_functional import oracle_dists

import fastvq
from fastvq import _search_triton as vs
from fastvq._search_torch import search_torch

pytestmark = pytest.mark.skipif(not fastvq.triton_available(), reason="needs Triton")

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _gluon(monkeypatch):
    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "gluon")


def _oracle(z, codebook):
    """fp64 argmin of the squared distance, ties -> lowest index (argmin returns the first)."""
    return oracle_dists(z, codebook).argmin(dim=1)


def _search(z, codebook, splits=None):
    n, d = z.shape
    plan = vs.plan_search(n, codebook.shape[0], d, z.dtype, codebook.dtype, arch=None,
                          num_sms=4, splits=splits)  # fmt: skip
    assert plan.gluon, "the twin must run"
    return vs.vq_search_triton(z, codebook, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "n, k, d, splits",
    [(1, 1, 8, None), (63, 1000, 40, None), (130, 257, 256, None), (300, 129, 64, None),
     (5, 128, 16, None), (200, 700, 64, 3), (17, 1000, 8, 4), (70, 300, 200, None)],
    ids=["N1-K1", "N63-K1000-odd-tiles", "D256-two-row-blocks", "K129-tail", "K128-one-tile",
         "splitK3", "splitK4-D8", "D200-padded-row-tile"],
)  # fmt: skip
def test_twin_equals_the_oracle_on_exact_scores(n, k, d, splits, dtype):
    g = torch.Generator().manual_seed(n + k + d)
    # small integers: bf16/fp16 hold them exactly and every score is exact in fp32, with many
    # exact ties within and across code tiles
    z = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    codebook = torch.randint(-3, 4, (k, d), generator=g).to(dtype)
    idx, z_q, err = _search(z, codebook, splits)
    assert torch.equal(idx, _oracle(z, codebook))
    assert torch.equal(z_q, codebook[idx])
    torch.testing.assert_close(err, (z.float() - codebook[idx].float()).square().sum(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_twin_ties_go_to_the_lowest_index_across_tiles_and_splits(dtype):
    """The same best code at 5, 133 (the next tile), 300 (the tail tile) and 260 + 640 (another
    split): the lowest wins, whichever tile or split sees it first."""
    g = torch.Generator().manual_seed(1)
    codebook = (torch.randn(1000, 64, generator=g) * 4).round().to(dtype)
    z = (torch.randn(40, 64, generator=g) * 4).round().to(dtype)
    for j, row in enumerate((5, 133, 300, 900)):
        codebook[row] = z[0]
        codebook[row + 1] = z[1] if j else codebook[row + 1]
    for splits in (None, 2, 5):
        idx, _, _ = _search(z, codebook, splits)
        assert idx[0].item() == 5 and idx[1].item() == 134
        assert torch.equal(idx, _oracle(z, codebook))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_twin_non_finite_rows_and_codes(dtype):
    """NaN and Inf rows get index 0 (the torch backend's policy), split or not; a code holding
    NaN or Inf never wins."""
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(300, 32, generator=g).to(dtype)
    z = torch.randn(50, 32, generator=g).to(dtype)
    codebook[7, 3] = float("nan")
    codebook[8, 0] = float("inf")
    z[9] = codebook[7].nan_to_num(0.0)  # its nearest would be the NaN code
    z[3] = float("nan")
    z[4, 5] = float("inf")
    for splits in (None, 2):
        idx, _, _ = _search(z, codebook, splits)
        assert idx[3].item() == 0 and idx[4].item() == 0
        assert not torch.isin(idx, torch.tensor([7, 8])).any()
        ref = search_torch(z, codebook)[0]
        finite = torch.ones(50, dtype=torch.bool)
        finite[[3, 4]] = False
        assert torch.equal(idx[finite], ref[finite])


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_twin_agrees_with_the_torch_backend_on_gaussian_rows(dtype):
    """Away from near-ties (the gap below fp32's rounding of the two scores) the twin picks the
    torch backend's code; scaled bf16 rows (tiny and huge) go through the launcher's scaling."""
    g = torch.Generator().manual_seed(3)
    # fp16 cannot hold the scaled values (and is searched unscaled)
    for scale in (1.0, 1e-30, 1e30) if dtype == torch.bfloat16 else (1.0,):
        z = (torch.randn(257, 48, generator=g) * scale).to(dtype)
        codebook = (torch.randn(515, 48, generator=g) * scale).to(dtype)
        idx, _, _ = _search(z, codebook)
        dist = oracle_dists(z, codebook)
        top2 = dist.topk(2, dim=1, largest=False).values
        gap = (top2[:, 1] - top2[:, 0]) / dist.max()
        clear = gap > 1e-5
        assert clear.float().mean() > 0.9
        assert torch.equal(idx[clear], search_torch(z, codebook)[0][clear])


def test_twin_runs_the_plan_of_an_h100():
    """Under the interpreter the twin gets the config and K splits sm_90 would run."""
    bf = torch.bfloat16
    for n, k, d in ((65536, 16384, 64), (1024, 65536, 256), (333, 1000, 40)):
        cpu = vs.plan_search(n, k, d, bf, bf, arch=None, num_sms=132, kernel="gluon")
        sm90 = vs.plan_search(n, k, d, bf, bf, arch=90, num_sms=132, kernel="gluon")
        assert cpu.gluon and sm90.gluon
        assert (cpu.config, cpu.splits, cpu.k_per_split) == (sm90.config, sm90.splits,
                                                              sm90.k_per_split)  # fmt: skip


def test_first_use_check_passes_on_the_twin():
    """The check that guards the sm_90 default, run through the twin: exact on its probe."""
    assert vs._gluon_probe(torch.device("cpu"), torch.bfloat16, 64)


def test_a_failed_first_use_check_warns_and_the_triton_kernel_runs(monkeypatch):
    """A wrong Gluon result (here: the norm pieces zeroed) fails the check with a warning that
    says what differed, and the default ("auto") launch on sm_90 goes to the Triton kernel."""
    from fastvq.kernels import vq_search

    monkeypatch.setattr(vs, "norm_pieces", lambda cnorm, rows: torch.zeros(rows, 16).bfloat16())
    with pytest.warns(RuntimeWarning, match="first-use check.*differ from the fp64 oracle"):
        assert not vs._gluon_probe(torch.device("cpu"), torch.bfloat16, 64)

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs) or args[5].zero_()

    monkeypatch.delenv("FASTVQ_SEARCH_KERNEL")
    monkeypatch.setattr(vs, "gpu_arch", lambda device: 90)
    monkeypatch.setattr(vs, "_GLUON_CHECKED", {(None, torch.bfloat16, 64): False})
    monkeypatch.setattr(vs, "vq_search_fwd_kernel", Recorder())
    monkeypatch.setattr(vq_search, "vq_search_fwd_kernel", Recorder())
    vs.vq_search_triton(torch.zeros(300, 64).bfloat16(), torch.ones(1000, 64).bfloat16())
    triton_cfg = vs.pick_config(300, 1000, 64, torch.bfloat16, arch=90, precision="tf32")
    assert len(launched) == 1 and launched[0]["BLOCK_K"] == triton_cfg.block_k


def test_a_check_that_never_finishes_raises_instead_of_hanging(monkeypatch):
    """The first-use check waits on an event with a deadline: a stuck kernel is an error that
    names the way out, not a silent hang."""

    class StuckEvent:
        def record(self, stream):
            pass

        def query(self):
            return False

    monkeypatch.setattr(torch.cuda, "Event", StuckEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    with pytest.raises(RuntimeError, match="did not finish.*FASTVQ_SEARCH_KERNEL=triton"):
        vs.finish_or_raise(torch.device("cuda"), seconds=0.05)


def test_tile_configs_the_gluon_kernel_cannot_run_go_to_triton():
    """An explicit config past the shared memory (two warpgroups' worth of rows more at D = 256)
    or with a row tile that is not a power of two is refused, so the Triton kernel runs it."""
    bf = torch.bfloat16
    for cfg, d in ((vs.SearchConfig(256, 128, 256, 16, 1), 256),
                   (vs.SearchConfig(128, 128, 96, 8, 1), 96)):  # fmt: skip
        assert not vs.gluon_config_ok(cfg, d)
        assert not vs.plan_search(100, 1000, d, bf, bf, arch=90, num_sms=132, kernel="gluon",
                                  config=cfg).gluon  # fmt: skip
    for d in (8, 64, 128, 200, 256):  # the defaults fit
        cfg = vs.plan_search(100, 1000, d, bf, bf, arch=90, num_sms=132, kernel="gluon").config
        assert vs.gluon_config_ok(cfg, d)


def test_auto_leaves_explicit_tile_configs_to_triton():
    """The first-use check covers the default config only: under "auto" an explicit config runs
    on the Triton kernel; FASTVQ_SEARCH_KERNEL=gluon still takes it where it fits."""
    bf = torch.bfloat16
    cfg = vs.SearchConfig(128, 64, 64, 8, 1)
    assert not vs.plan_search(100, 1000, 64, bf, bf, arch=90, num_sms=132, kernel="auto",
                              config=cfg).gluon  # fmt: skip
    assert vs.plan_search(100, 1000, 64, bf, bf, arch=90, num_sms=132, kernel="gluon",
                          config=cfg).gluon  # fmt: skip
    assert vs.plan_search(100, 1000, 64, bf, bf, arch=90, num_sms=132, kernel="auto").gluon


def test_running_out_of_memory_in_the_check_is_no_verdict(monkeypatch):
    """Out of memory during the first-use check fails this call only: nothing is cached."""

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("no memory")

    monkeypatch.setattr(vs, "vq_search_triton", oom)
    monkeypatch.setattr(vs, "_GLUON_CHECKED", {})
    assert vs._gluon_probe(torch.device("cpu"), torch.bfloat16, 64) is None
    assert not vs.gluon_checked(torch.device("cpu"), torch.bfloat16, 64)
    assert vs._GLUON_CHECKED == {}
