"""GPU readiness without a GPU: every default binary compiles for sm_80 and sm_90 spill-free.

The gate compiles in a subprocess without ``TRITON_INTERPRET`` (conftest sets it, and under it
``triton.compile`` makes no cubin). The other tests check that what the gate compiles is what the
launcher launches on such a GPU, and run each GPU default tile under the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_functional import assert_nearest

from fastvq import _search_triton as vs

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_default_binaries_pass_the_gate():
    """Spill-free, tensor-core MMAs, shared memory in bounds, >= 8 resident warps/SM."""
    r = _run(["-m", "benchmarks.gpu_static", "--gate"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "default binaries pass the gate" in r.stdout


SPILLING = """
import json
from benchmarks.gpu_static import Binary, compile_one, gate_failures
# The pre-gate bf16 default for D=100 on sm_90: 34 spill stores when it was the default.
b = Binary("bf16 D100 old", "search", 90, True, z_dtype="bfloat16", c_dtype="bfloat16", d=100,
           config=(128, 64, 64, 8, 3))
rec = compile_one(b)
print(json.dumps({"gate": gate_failures(rec), "regs": rec["regs"], "mma": rec["mma"]}))
"""


def test_a_spilling_config_fails_the_gate():
    r = _run(["-c", SPILLING], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("spills" in why for why in out["gate"]), out
    assert out["mma"] and "HGMMA" in out["mma"]


CASES = [  # (z dtype, codebook dtype, D, N, K): aligned, unaligned, split-K, autocast's mix
    (torch.bfloat16, torch.bfloat16, 64, 65536, 16384),
    (torch.bfloat16, torch.bfloat16, 100, 65536, 16384),
    (torch.float32, torch.float32, 64, 65536, 16384),
    (torch.float32, torch.float32, 100, 65536, 16384),
    (torch.bfloat16, torch.float32, 256, 65536, 16384),
    (torch.float16, torch.float16, 256, 1024, 65536),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("zt, ct, d, n, k", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gated_binary_is_the_one_the_launcher_uses(monkeypatch, arch, zt, ct, d, n, k):
    """The launcher on that GPU and the static gate derive the same constexprs and launch."""
    from benchmarks.gpu_static import ARCHS, Binary, _search_launch

    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(kwargs, grid=grid)
                args[5].zero_()  # the indices: the launcher's post-processing gathers with them

            return launch

    sms = ARCHS[arch]["sms"]
    # the Triton binaries (on sm_90 "auto" would take the Gluon kernel for 16-bit operands;
    # test_gluon_launch_is_the_gated_one covers that launch)
    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "triton")
    monkeypatch.setattr(vs, "vq_search_fwd_kernel", Recorder())
    monkeypatch.setattr(vs, "gpu_arch", lambda device: arch)
    monkeypatch.setattr(vs, "_num_sms", lambda device: sms)
    z = torch.zeros(n, d, dtype=zt)
    c = torch.ones(k, d, dtype=ct)
    vs.vq_search_triton(z, c)
    name = lambda t: str(t).removeprefix("torch.")  # noqa: E731
    b = Binary("x", "search", arch, True, z_dtype=name(zt), c_dtype=name(ct), d=d, n=n, k=k)
    _, _, gated, plan = _search_launch(b)
    assert launched.pop("grid")[1] == plan.splits
    assert launched == gated


GPU_DEFAULTS = [  # (dtype, D, precision): one per distinct default tile shape
    (torch.bfloat16, 64, None),
    (torch.bfloat16, 100, None),
    (torch.bfloat16, 256, None),
    (torch.bfloat16, 8, None),
    (torch.float32, 64, "tf32x3"),
    (torch.float32, 100, "tf32x3"),
    (torch.float32, 100, "ieee"),
    (torch.float32, 256, "tf32x3"),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype, d, precision", GPU_DEFAULTS, ids=str)
def test_gpu_default_tiles_are_exact_under_the_interpreter(arch, dtype, d, precision):
    """Each tile a GPU runs by default, at a tiny size: two row blocks and several code tiles."""
    cfg = vs.pick_config(65536, 16384, d, dtype, arch=arch, precision=precision or "tf32x3")
    n, k = cfg.block_n + 3, 2 * cfg.block_k + 5
    g = torch.Generator().manual_seed(d)
    z = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    c[k - 1] = c[1]  # a bitwise tie across code tiles: the lower index must win
    z[0] = c[1]
    for splits in (1, 2):
        idx, z_q, err = vs.vq_search_triton(z, c, config=cfg, splits=splits)
        assert_nearest(idx, z, c)
        assert idx[0].item() == 1
        torch.testing.assert_close(z_q, c[idx])
        ref = (z.float() - c[idx].float()).square().sum(1)
        torch.testing.assert_close(err, ref)


def test_loop_mix_per_element_and_overlap_flag():
    """The static report's loop figure (non-MMA per accumulator element) and TTGIR overlap."""
    from benchmarks.gpu_static import analyse_ttgir, loop_per_element

    cfg = vs.SearchConfig(128, 64, 64, 8, 3)  # 32 accumulator elements per thread
    outer = dict(tensor=4, fma=40, cmp_sel=100, int_alu=8, cvt=0, mem=12, move=0, uniform=0,
                 other=0)  # fmt: skip
    inner = dict(outer, tensor=2, fma=16, cmp_sel=0, int_alu=0, mem=0)
    assert loop_per_element({"outer": outer, "inner": None}, cfg) == 5.0
    assert loop_per_element({"outer": outer, "inner": inner}, cfg) == 5.5  # D loop once
    assert loop_per_element(None, cfg) is None
    waits = "%a:3 = ttng.warp_group_dot_wait %x, %y {pendings = %s : i32} : tensor<...>"
    assert analyse_ttgir(waits.replace("%s", "0"))["overlap"] is False
    ov = analyse_ttgir(waits.replace("%s", "0") + "\n" + waits.replace("%s", "1"))
    assert ov["overlap"] and ov["dot_wait_pendings"] == [0, 1]
    assert analyse_ttgir("ttg.warp_specialize(%a)")["overlap"]
    assert analyse_ttgir("tt.dot")["overlap"] is False  # sm_80: mma.sync, no async dot


def test_gate_reports_the_sm90_targets(tmp_path):
    """Every binary carries the loop figure and the overlap flag; the bf16 targets are printed."""
    out = tmp_path / "s.json"
    r = _run(["-m", "benchmarks.gpu_static", "--gate", "--arch", "90", "--only", "bf16 D64",
              "--out", str(out)], timeout=600)  # fmt: skip
    assert "target sm_90 bf16 D64:" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    recs = json.loads(out.read_text())["binaries"]
    assert recs and all(r["loop_per_element"] > 0 and "overlap" in r["overlap"] for r in recs)
    assert "non-MMA / acc. element" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "zt, d, n, k",
    [(torch.bfloat16, 64, 65536, 16384), (torch.float16, 256, 1024, 65536),
     (torch.bfloat16, 40, 333, 1000)],
    ids=["bf16-D64", "fp16-D256-splitK", "bf16-D40-odd"],
)  # fmt: skip
def test_gluon_launch_is_the_gated_one(monkeypatch, zt, d, n, k):
    """FASTVQ_SEARCH_KERNEL=gluon on sm_90: the launch the gate compiles, whole code tiles per
    split, and the norm pieces padded with -inf past the last tile (the kernel reads them
    unmasked)."""
    from benchmarks.gpu_static import ARCHS, Binary, _search_launch
    from fastvq.kernels import vq_search_sm90

    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(kwargs, grid=grid, pieces=args[2].base)
                args[5].zero_()  # the (partial) indices

            return launch

    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "gluon")
    monkeypatch.setattr(vq_search_sm90, "vq_search_fwd_sm90_kernel", Recorder())
    monkeypatch.setattr(vs, "gpu_arch", lambda device: 90)
    monkeypatch.setattr(vs, "_num_sms", lambda device: ARCHS[90]["sms"])
    vs.vq_search_triton(torch.zeros(n, d, dtype=zt), torch.ones(k, d, dtype=zt))
    name = str(zt).removeprefix("torch.")
    b = Binary("x", "search_gluon", 90, False, z_dtype=name, c_dtype=name, d=d, n=n, k=k)
    fn, args, gated, plan = _search_launch(b)
    assert plan.gluon and plan.k_per_split % plan.config.block_k == 0
    assert launched.pop("grid")[1] == plan.splits
    pieces = launched.pop("pieces")  # -||c||^2 / 2 in three bf16 parts, -inf past K
    assert pieces.shape[0] % plan.config.block_k == 0 and pieces.shape[0] >= k
    assert (pieces[k:, 0] == float("-inf")).all() and torch.isfinite(pieces[:k]).all()
    assert (pieces[:k, 3:] == 0).all()
    assert launched == gated


def test_search_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("FASTVQ_SEARCH_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="FASTVQ_SEARCH_KERNEL"):
        vs.search_kernel()
    # where the Gluon kernel does not apply (fp32, sm_80, D > 256) the Triton kernel runs
    for args in ((torch.float32, 90, 64), (torch.bfloat16, 80, 64), (torch.bfloat16, 90, 512),
                 (torch.bfloat16, 90, 100)):  # fmt: skip
        dt, arch, d = args
        assert not vs.plan_search(100, 1000, d, dt, dt, arch=arch, num_sms=132,
                                  kernel="gluon").gluon  # fmt: skip
    # a Triton tile config the Gluon kernel cannot run (the row tile short of D) goes to Triton
    cfg = vs.SearchConfig(128, 64, 64, 8, 3)
    bf = torch.bfloat16
    assert not vs.plan_search(100, 1000, 256, bf, bf, arch=90, num_sms=132, kernel="gluon",
                              config=cfg).gluon  # fmt: skip
    assert vs.plan_search(100, 1000, 64, bf, bf, arch=90, num_sms=132, kernel="gluon",
                          config=vs.SearchConfig(128, 64, 64, 8, 1)).gluon  # fmt: skip


def test_norm_pieces_sum_exactly_to_minus_half_the_norms():
    """Three bf16 pieces (the sign and 8 significant bits each) hold an fp32 value exactly while
    the last piece stays a normal number (values above about 2^-100; the launcher's power-of-two
    scaling keeps norms there); below, the error is below bf16's subnormal step."""
    g = torch.Generator().manual_seed(0)
    cn = torch.exp(torch.empty(5000).uniform_(-69, 88, generator=g)).float()
    cn[:3] = torch.tensor([0.0, 1.0, 3.4e38 / 2])
    pieces = vs.norm_pieces(cn, 5120)
    assert pieces.dtype == torch.bfloat16 and pieces.shape == (5120, 16)
    assert torch.equal(pieces[:5000, :3].double().sum(1), (cn.double() * -0.5))
    assert (pieces[5000:, 0] == float("-inf")).all() and (pieces[:, 3:] == 0).all()
    tiny = torch.tensor([1e-33, 3e-36, 1e-38])
    err = vs.norm_pieces(tiny, 3)[:, :3].double().sum(1) - tiny.double() * -0.5
    assert err.abs().max() < 1e-40


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("d", [32, 33, 64, 100, 256])
def test_gated_soft_binaries_are_the_ones_the_launcher_uses(monkeypatch, arch, d):
    """Each soft-assignment launch on that GPU (forward with column sums, backward with every
    upstream gradient) passes the keywords the gate compiles, D loop or held tile alike."""
    from benchmarks.gpu_static import SOFT_DS, Binary, _soft_launch
    from fastvq import _soft_assign_triton as sa

    assert d in SOFT_DS
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name  # the column kernel is two binaries, told apart by BWD

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                name = self.name or ("soft_col_bwd" if kwargs["BWD"] else "soft_col")
                launched.append((name, grid, kwargs))

            return launch

    monkeypatch.setattr(sa, "soft_assign_fwd_kernel", Recorder("soft_fwd"))
    monkeypatch.setattr(sa, "soft_assign_col_kernel", Recorder(None))
    monkeypatch.setattr(sa, "soft_assign_bwd_row_kernel", Recorder("soft_row_bwd"))
    monkeypatch.setattr(sa, "_arch", lambda device: arch)
    n, k, sim = 300, 200, "neg_dist"
    z, c, w = torch.randn(n, d), torch.randn(k, d), torch.ones(n)
    lse = torch.zeros(n)
    sa.soft_assign_fwd_triton(z, c, w, 1.0, sim, 1e-4, True)
    sa.soft_assign_bwd_triton(z, c, w, lse, lse, lse, z, torch.ones(k), 1.0, sim, 1e-4,
                              need_z=True, need_c=True)  # fmt: skip
    assert [name for name, _, _ in launched] == ["soft_fwd", "soft_col", "soft_row_bwd",
                                                 "soft_col_bwd"]  # fmt: skip
    for name, grid, kwargs in launched:
        b = Binary("x", name, arch, True, z_dtype="float32", c_dtype="float32", d=d, n=n, k=k,
                   sim=sim)  # fmt: skip
        _, _, gated, _ = _soft_launch(b)
        assert kwargs == gated, name
        cfg = b.meta["config"]
        chunks = 1 if name == "soft_col" else -(-d // cfg[2])
        assert grid[1] == chunks and (cfg[5] > 0) == (d % 16 != 0 or d > 64), (name, cfg)


def _sass(*ops):
    """Instructions in nvdisasm's layout (address comment, padding, a space before ';')."""
    pad = " " * 19
    return "\n".join(f"        /*{16 * i:04x}*/{pad}{op} ;" for i, op in enumerate(ops))


def test_wgmma_serialisation_is_each_hgmma_waited_for_at_once():
    from benchmarks.gpu_static import wgmma_serialised

    mma = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"
    wait = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
    assert wgmma_serialised(_sass(mma, wait, mma, wait))
    # one HGMMA per group (D <= 16) closes every group, but the next issues before any wait
    assert not wgmma_serialised(_sass(mma, "WARPGROUP.ARRIVE", mma, wait))
    assert not wgmma_serialised(_sass("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24", mma, wait))


def test_epilogue_under_mma_counts_float_epilogue_work_between_the_waits():
    from benchmarks.gpu_static import epilogue_under_mma

    sass = _sass(
        "WARPGROUP.DEPBAR.LE gsb0, 0x2", "FMNMX R2, R24, R25, !PT",
        "SHFL.BFLY PT, R3, R2, 0x1, 0x1f", "ISETP.LT.AND P0, PT, R4, UR5, PT", "SEL R6, R7, R8, P0",
        "FSEL R9, R24, R9, P1", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "FMNMX R2, R26, R27, !PT",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1", "IADD3 R1, R1, 0x1, RZ", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    )  # fmt: skip
    # loop control (integer compares and selects) is not epilogue work
    assert epilogue_under_mma(sass) == [3, 0]
