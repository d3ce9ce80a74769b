"""The CPU search's pool threads: the caller's modes and threads do not change the result.

The torch backend runs row blocks on pool threads (fastvq/_search_torch.py). Inference and grad
mode are thread local, so the pool must take the caller's (an inference-mode caller's outputs are
inference tensors that a worker outside inference mode may not write).
"""

import threading

import pytest
import torch

import fastvq


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2100, 24, generator=g), torch.randn(700, 24, generator=g)


def _oracle(z, c):
    return torch.cdist(z.double(), c.double()).argmin(1)


def test_search_under_inference_mode_and_no_grad():
    z, c = _inputs()
    ref = _oracle(z, c)
    with torch.inference_mode():
        idx, zq, err = fastvq.search(z, c, backend="torch")
        assert zq.is_inference()
        q, idx2, _ = fastvq.vector_quantize(z, c, backend="torch")
    with torch.no_grad():
        idx3 = fastvq.search(z, c, backend="torch")[0]
    for i in (idx, idx2, idx3):
        assert torch.equal(i, ref)


def test_search_same_result_for_one_and_two_threads_and_concurrent_callers():
    z, c = _inputs()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastvq.search(z, c, backend="torch")
        torch.set_num_threads(2)
        two = fastvq.search(z, c, backend="torch")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    assert torch.get_num_threads() == before  # the pool leaves the caller's count alone
    out = {}

    def run(k):
        out[k] = fastvq.search(z, c, backend="torch")[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and all(torch.equal(v, one[0]) for v in out.values())


def test_search_with_float64_default_dtype():
    """The CPU search's own buffers are fp32 whatever torch's default dtype (they were created
    with the default: Float vs Double GEMM errors)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for d in (64, 256):  # addmm and the oneDNN path
            g = torch.Generator().manual_seed(d)
            z = torch.randn(300, d, generator=g, dtype=torch.float32)
            c = torch.randn(200, d, generator=g, dtype=torch.float32)
            idx = fastvq.search(z, c, backend="torch")[0]
            assert torch.equal(idx, _oracle(z, c))
    finally:
        torch.set_default_dtype(before)


def _exact_argmin(z, c):
    """fp64 squared distances without the GEMM expansion: exact for small integer inputs, so
    exact ties stay ties and ``argmin`` takes the lowest index."""
    exact = "donot_use_mm_for_euclid_dist"
    return torch.cdist(z.double(), c.double(), compute_mode=exact).argmin(1)


def test_wide_path_default_tiles_ties_and_non_finite():
    """D >= 128 (oneDNN GEMM, 2048 x 1024 tiles, reordered weights): several row and code blocks,
    exact ties inside a chunk, across chunks and across code blocks, NaN/Inf rows and codes, at
    one and two threads."""
    g = torch.Generator().manual_seed(11)
    d = 128
    c = torch.randint(-2, 3, (2300, d), generator=g).float()
    c[1500] = c[7]  # a tie across code blocks (1024 codes each): 7 must win
    c[100] = c[70]  # inside one 128-code chunk: 70 must win
    c[300] = c[200]  # across chunks of one tile: 200 must win
    c[9, 4] = float("nan")  # never selected
    c[2299, 0] = float("inf")
    z = torch.randint(-2, 3, (4200, d), generator=g).float()
    z[:600] = c[torch.tensor([7, 70, 200, 1500, 100, 300]).repeat(100)]
    z[:600, :3] += 0.5  # equidistant from each pair of duplicates, not on a code
    z[4100, 2] = float("nan")
    z[4101, 5] = float("-inf")
    finite = torch.isfinite(c).all(1)
    far = torch.where(finite[:, None], c, 1e6)  # the oracle never picks a non-finite code
    ref = _exact_argmin(z.nan_to_num(0.0, 0.0, 0.0), far)
    ref[4100] = ref[4101] = 0  # a non-finite row gets index 0
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            idx, zq, err = fastvq.search(z, c, backend="torch")
            assert torch.equal(idx, ref), threads
            assert torch.equal(idx[:600:6], torch.full((100,), 7))
            assert torch.equal(zq, c[idx])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("k", [1024, 3000])  # one code block per row block; several
@pytest.mark.parametrize("threads", [1, 2])
def test_index_inside_best_chunk_is_the_first_match(k, threads):
    """The index inside a row's best 128-code chunk is its first position equal to the row's
    minimum: ties at the chunk's first and last positions, a chunk of only +inf distances (every
    code non-finite) and a zero distance, at D < 128 (addmm path)."""
    g = torch.Generator().manual_seed(5)
    d = 64
    c = torch.randint(-2, 3, (k, d), generator=g).float()
    c[127] = c[0]  # first and last position of chunk 0: 0 must win
    c[640 + 127] = c[640 + 5]  # inside chunk 5: 645 must win
    c[k - 1] = c[k - 129]  # last code against the previous chunk: k - 129 must win
    z = torch.randint(-2, 3, (900, d), generator=g).float()
    z[:300] = c[torch.tensor([0, 645, k - 129]).repeat(100)]  # distance 0 to both twins
    z[300:330, :2] += 0.5  # off every code
    ref = _exact_argmin(z, c)
    assert torch.equal(ref[:3], torch.tensor([0, 645, k - 129]))
    bad = torch.full_like(c, float("nan"))  # every code non-finite: index 0 for every row
    bad_tail = bad.clone()
    bad_tail[k - 200 :] = c[k - 200 :]  # only the last codes are finite
    ref_tail = (k - 200) + _exact_argmin(z, c[k - 200 :])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        idx, zq, _ = fastvq.search(z, c, backend="torch")
        assert torch.equal(idx, ref)
        assert torch.equal(zq, c[idx])
        assert torch.equal(fastvq.search(z, bad, backend="torch")[0], torch.zeros(900).long())
        assert torch.equal(fastvq.search(z, bad_tail, backend="torch")[0], ref_tail)
    finally:
        torch.set_num_threads(before)
