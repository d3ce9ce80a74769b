"""Huge, tiny and subnormal finite inputs rank correctly on both backends (issue: magnitudes).
Both backends search ``s^2 dist`` with one power-of-two scale ``s`` of the inputs (a device
scalar), so nothing overflows or underflows; before it, 1.5e19 picked a wrong code, 1e20 returned
an infinite loss and inputs near 1e-25 all returned code 0.
"""

import pytest
import torch
from test_functional import assert_nearest

import fastvq

# Also selected by `pytest -m cuda` in benchmarks/gpu_check.sh: there they run compiled kernels.
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(
    "z, codes, want",
    [
        ([1.5e19], [[0.0], [1.4e19], [1.5e19]], 2),
        ([1e20], [[1e20], [0.0]], 0),
        ([1e-25], [[0.0], [1e-25], [3e-25]], 1),
        ([2e-25], [[0.0], [1e-25], [3e-25]], 1),
        ([1e-40], [[0.0], [1e-40], [3e-40]], 1),  # subnormal fp32
        ([3e38], [[-3e38], [1e38], [0.0]], 1),  # near fp32's largest
    ],
    ids=["1.5e19", "1e20", "1e-25", "2e-25", "subnormal", "3e38"],
)
def test_issue_examples(backend, device, z, codes, want):
    z = torch.tensor([z], dtype=torch.float32, device=device)
    codes = torch.tensor(codes, dtype=torch.float32, device=device)
    idx, z_q, err = fastvq.search(z, codes, backend=backend)
    assert idx.tolist() == [want]
    assert torch.equal(z_q, codes[want][None])
    if abs(z.item()) < 1e19:  # (z - z_q)^2 itself is representable in fp32 then
        assert torch.isfinite(err).all()


EXPONENTS = [-140, -100, -60, -20, 0, 20, 60, 100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ez", EXPONENTS, ids=lambda e: f"z2^{e}")
def test_random_magnitudes_within_tau(backend, device, dtype, ez):
    """The fp64 distance of the chosen code is within tau of the fp64 best, at every scale."""
    g = torch.Generator().manual_seed(ez + 1000)
    for ec in (ez, ez + 30, ez - 30):
        if ec > 120:  # beyond fp32's range: the codes themselves would be Inf
            continue
        z = (torch.randn(63, 5, generator=g, dtype=torch.float64) * 2.0**ez).to(dtype)
        c = (torch.randn(40, 5, generator=g, dtype=torch.float64) * 2.0**ec).to(dtype)
        c[7] = c[3]  # a bitwise tie as well
        idx, _, _ = fastvq.search(z.to(device), c.to(device), backend=backend)
        assert_nearest(idx, z, c)


@pytest.mark.parametrize("ez", [-24, -10, 0, 10, 13], ids=lambda e: f"z2^{e}")
def test_fp16_range(backend, device, ez):
    """fp16 is searched unscaled (its range cannot overflow fp32 sums), subnormals included."""
    g = torch.Generator().manual_seed(ez + 2000)
    z = (torch.randn(63, 8, generator=g) * 2.0**ez).half()
    c = (torch.randn(50, 8, generator=g) * 2.0**ez).half()
    idx, _, _ = fastvq.search(z.to(device), c.to(device), backend=backend)
    assert_nearest(idx, z, c)


def test_scale_is_an_exact_power_of_two():
    from fastvq._search_torch import magnitude_scale

    z = torch.tensor([[3.0, -5.0], [float("nan"), 1e30]])  # the NaN row is left out
    c = torch.tensor([[0.25, float("inf")], [1.0, 2.0]])  # so is the Inf code
    s = magnitude_scale(z, c)
    assert s.dtype == torch.float32 and s.item() == 2.0**-3  # max |x| = 5 -> 5/8 in [0.5, 1)
    assert magnitude_scale(torch.zeros(2, 3), torch.zeros(1, 3)).item() == 1.0
    tiny = magnitude_scale(torch.full((1, 1), 1e-44), torch.zeros(1, 1)).item()
    assert tiny == 2.0**126  # clamped: s stays a normal fp32 number
