"""Pure-torch nearest-code search: the readable twin of the Triton kernel and the CPU path.

The contract is the one of ``kernels/vq_search.py``: for ``z2d`` (N, D) and ``codebook`` (K, D)
return ``(indices, z_q, err)`` with ``indices`` int64 (N,), ``z_q = codebook[indices]`` in ``z2d``'s
dtype and ``err`` fp32 (N,) the squared error ``sum_d (z - z_q)^2``.

It never allocates an N x K tensor: rows are processed in blocks of ``block_n`` and codes in blocks
of ``block_k``, each (row block x code block) tile is one GEMM (``addmm``, or on CPU oneDNN's fused
linear when it runs), and a running (min, argmin) per row carries across code blocks. That is the
same loop the kernel runs. On CPU, row blocks run on parallel threads (see :func:`_search_cpu`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import threading

import torch

# Tile sizes: a tile of 1024 x 512 fp32 distances (2 MiB) stays in the core's cache between the
# addmm that writes it and the min that reads it. Measured single-threaded on the 2-core AMD EPYC
# (N=16384, K=8192, D=64, 2026-11-26, machine shared with other jobs, so +-30% noise): 1024x512
# 470-740 ms, 4096x1024 (16 MiB) 670-1420 ms, faiss IndexFlatL2 470-590 ms. Row-only chunking
# (the whole K per row block) was 2.5x slower at K=65536 in earlier trials.
DEFAULT_BLOCK_N = 1024
DEFAULT_BLOCK_K = 512
# CPU: a tile's minimum is taken per chunk of this many codes (see _search_cpu); from the
# _PLAIN_AFTER-th code block of a row block on, few rows improve and the plain path is cheaper.
_CHUNK = 32
_PLAIN_AFTER = 16

# Tests set this to fill the index output with -1 before the loop, so a row block the loop
# forgets to write fails loudly.
POISON_OUTPUTS = False


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 (rows,) max |x| per row; NaN or Inf exactly for the rows holding NaN/Inf."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    # amax and amin propagate NaN/Inf, so a non-finite row stays non-finite. Two plain reductions:
    # on CPU aminmax(dim=1) is 10x slower than both together (scalar loop over short rows).
    return torch.maximum(x.amax(dim=1), -x.amin(dim=1)).to(torch.float32)


def scale_and_row_finite(
    z2d: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(magnitude_scale(z2d, codebook), bool (N,) rows of z2d without NaN/Inf)`` in one pass."""
    zmax, cmax = _row_absmax(z2d), _row_absmax(codebook)
    zero = torch.zeros((), device=z2d.device)
    row_finite = torch.isfinite(zmax)

    def finite_max(m: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, m, zero).amax() if m.numel() else zero

    m = torch.maximum(finite_max(zmax, row_finite), finite_max(cmax, torch.isfinite(cmax)))
    _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1); m = 0 gives e = 0
    # Built from its bits, so s is exactly 2^-e; the clamp keeps s and 1/s normal fp32 numbers.
    e = e.to(torch.int32).clamp(-126, 126)
    return ((127 - e) << 23).view(torch.float32), row_finite


def magnitude_scale(z2d: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim power of two ``s`` with ``max |x| * s`` in [0.5, 1) over the finite rows of both.

    Both backends search ``s^2 dist = ||s c||^2 - 2 (s z).(s c)``: multiplying by a power of two is
    exact, so the order of the distances is unchanged, while no product, sum or norm can overflow
    (huge inputs) or underflow (tiny or subnormal inputs). Rows or codes holding NaN/Inf are left
    out (they are never selected, or get index 0). Computed on the device, so no host sync.
    """
    return scale_and_row_finite(z2d, codebook)[0]


def code_norms(
    codebook: torch.Tensor, chunk_elems: int = 1 << 24, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 (K,) squared norms ``||scale c||^2``; +inf for a code holding NaN/Inf.

    Both backends take their norms from here, so they share the NaN policy (see
    ``fastvq.functional``): a code with an infinite norm is never selected. Computed in chunks of
    rows so that a bf16 codebook never gets a whole K x D fp32 copy (256 MiB at K = 262144,
    D = 256) just for its norms.
    """
    k, d = codebook.shape
    out = torch.empty(k, dtype=torch.float32, device=codebook.device)
    step = max(1, chunk_elems // max(d, 1))
    inf = torch.full((), float("inf"), device=codebook.device)
    for i in range(0, k, step):
        c = codebook[i : i + step].to(torch.float32)
        if scale is None:
            finite = torch.isfinite(c).all(dim=1)
            sq = c.square().sum(dim=1)
        else:
            # Scaled, a finite code's squares cannot overflow: its norm is finite exactly when the
            # code is, and no separate finiteness pass is needed.
            sq = (c * scale).square().sum(dim=1)
            finite = torch.isfinite(sq)
        out[i : i + step] = torch.where(finite, sq, inf)
    return out


def sanitize_codes(
    codebook32: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scale codes, ||scale c||^2)`` in fp32; a non-finite code is never selected.

    A code with an infinite norm (it holds NaN or Inf) also gets zeroed values, so the GEMM stays
    finite and its distance to every row is +inf.
    """
    norms = code_norms(codebook32, scale=scale)
    zero = torch.zeros((), device=codebook32.device)
    codes = codebook32 if scale is None else codebook32 * scale
    return torch.where(torch.isfinite(norms)[:, None], codes, zero), norms


@functools.cache
def _onednn_linear_ok() -> bool:
    """True when oneDNN's fused ``X W^T + b`` op (the one inductor uses for CPU linears) runs here.

    It replaces ``addmm`` on CPU: it adds the code norms inside the GEMM (no pass to copy them into
    the tile first) and runs ~8% faster than MKL's sgemm at D=256 on the 2-core AMD EPYC. It is a
    private op, so it is tried once on a small problem; any failure or a wrong value means addmm.
    """
    try:
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return False
        z = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        w = torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3.0
        b = torch.tensor([0.5, -1.0])
        got = torch.ops.mkldnn._linear_pointwise(
            z, torch.ops.mkldnn._reorder_linear_weight(w, 3), b, "none", [], ""
        )
        return torch.equal(got, torch.addmm(b, z, w.t()))
    except Exception:
        return False


class _Codes:
    """The GEMM operand of every code block, made once per call and shared by all row blocks."""

    def __init__(self, codes: torch.Tensor, norms: torch.Tensor, bk: int, bn: int):
        self.onednn = _onednn_linear_ok()
        k = codes.shape[0]
        if self.onednn:
            weights = codes * -2.0  # exact: tile = ||c||^2 + z.(-2c), norms as the fused bias
            reorder = torch.ops.mkldnn._reorder_linear_weight
            ops = [reorder(weights[k0 : k0 + bk], bn) for k0 in range(0, k, bk)]
        else:
            codes_t = codes.t()  # (D, K) view: addmm reads it as a transposed operand, no copy
            ops = [codes_t[:, k0 : k0 + bk] for k0 in range(0, k, bk)]
        starts = range(0, k, bk)
        self.blocks = [(k0, op, norms[k0 : k0 + bk]) for k0, op in zip(starts, ops, strict=True)]

    def tile(self, zb: torch.Tensor, op: torch.Tensor, nb: torch.Tensor, buf: torch.Tensor):
        """(rows, bk) fp32 ``||c||^2 - 2 z.c`` of one row block against one code block."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(zb, op, nb, "none", [], "")
        tile = buf[: zb.shape[0] * nb.shape[0]].view(zb.shape[0], nb.shape[0])
        return torch.addmm(nb, zb, op, beta=1.0, alpha=-2.0, out=tile)


@torch.no_grad()
def search_torch(
    z2d: torch.Tensor,
    codebook: torch.Tensor,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code by squared L2 for every row, tiled so that no N x K tensor exists.

    Args:
        z2d: (N, D) float tensor, any strides.
        codebook: (K, D) float tensor, K >= 1, same device.
        block_n, block_k: tile sizes (rows x codes) of one distance tile.

    Returns:
        indices: int64 (N,), ties to the lowest index.
        z_q: (N, D) in ``z2d.dtype``, exactly ``codebook[indices]`` cast.
        err: fp32 (N,), ``sum_d (z - z_q)^2`` computed from ``z`` and the gathered code directly
            (adding ``||z||^2`` back to the GEMM distance would cancel catastrophically).

    Distances are ``||c||^2 - 2 z.c`` in fp32 whatever the input dtype (``||z||^2`` is constant per
    row), ranked after an exact power-of-two rescaling (:func:`magnitude_scale`), so huge and tiny
    finite inputs rank correctly. A row holding NaN/Inf gets index 0; a non-finite code is never
    selected.
    """
    n, _ = z2d.shape
    dev = z2d.device
    if n == 0:
        idx = torch.empty(0, dtype=torch.int64, device=dev)
        return idx, z2d.new_empty(z2d.shape), torch.empty(0, dtype=torch.float32, device=dev)
    if dev.type != "cpu":
        return _search_sync_free(z2d, codebook, block_n, block_k)
    return _search_cpu(z2d, codebook, block_n, block_k)


def _search_cpu(z2d, codebook, block_n, block_k):
    """The CPU loop: row blocks on parallel threads, each tile's index from chunk minima.

    - **Index of the minimum.** ``argmin`` over a tile row is a scalar loop on CPU (~20x slower
      than ``amin``). Each tile is viewed as chunks of ``_CHUNK`` codes: ``amin`` per chunk, then
      the tile minimum from those. Only rows whose best improved need an index: the first chunk
      holding their minimum (``argmin`` over the few chunk minima), then ``argmin`` over that one
      chunk. Both ``argmin`` take the first occurrence, and chunks are in code order, so exact ties
      go to the lowest index; across tiles, strict ``<`` keeps the earlier one.
    - **Threads.** Many small ops per tile each open an OpenMP region: with T > 1 intra-op threads
      their barriers cost more than they save, and much more on a loaded machine. Instead T Python
      threads (the ops release the GIL) each take whole row blocks with one intra-op thread.
    - **Per row block:** the scaled rows, the gathered codes and the error are made one row block
      at a time, so no (N, D) temporary beyond the outputs exists.
    """
    n, d = z2d.shape
    k = codebook.shape[0]
    threads = torch.get_num_threads()
    k32 = -(-k // _CHUNK) * _CHUNK
    bk = min(block_k, k32)  # a multiple of _CHUNK unless block_k is not
    if block_k == DEFAULT_BLOCK_K and bk < k32 <= 4 * bk:
        # Up to 2048 codes: one code block of the same area, so each row's index is found once
        # (1024 x 64: 0.95x faiss's time -> 0.92x with two 512-code blocks; 2048: 10% faster).
        block_n, bk = max(1, block_n * bk // k32), k32
    # Split a small batch so that every thread gets a row block (and rows stay cache-sized).
    bn = max(1, min(block_n, -(-n // threads)))
    chunk = math.gcd(bk, _CHUNK)
    kp = -(-k // bk) * bk  # K padded to whole code blocks: every tile has bk columns

    scale, row_finite = scale_and_row_finite(z2d, codebook)
    all_finite = bool(row_finite.all())  # on CPU: no device sync
    codes, norms = sanitize_codes(codebook.to(torch.float32), scale)
    if kp != k:  # padding codes: zero, with an infinite norm, so never selected
        codes = torch.cat([codes, codes.new_zeros(kp - k, d)])
        norms = torch.cat([norms, norms.new_full((kp - k,), float("inf"))])
    ops = _Codes(codes, norms, bk, bn)

    indices = torch.empty(n, dtype=torch.int64)
    if POISON_OUTPUTS:
        indices.fill_(-1)
    z_q = torch.empty(z2d.shape, dtype=z2d.dtype)
    err = torch.empty(n, dtype=torch.float32)
    gather_into_zq = codebook.dtype == z2d.dtype

    groups = bk // chunk
    first_chunk = torch.arange(bn) * groups  # row i's chunk 0 in the (r * groups, chunk) view

    def row_block(n0: int, buf: torch.Tensor) -> None:
        n1 = min(n0 + bn, n)
        r = n1 - n0
        z_in = z2d[n0:n1].to(torch.float32)
        zb = (z_in * scale).contiguous()  # the GEMM operand
        if not all_finite:  # non-finite rows: zeroed for the GEMM, index 0 below
            zb.masked_fill_(~row_finite[n0:n1, None], 0.0)
        best_i = indices[n0:n1]  # written in place
        best = None
        for j, (k0, op, nb) in enumerate(ops.blocks):
            tile = ops.tile(zb, op, nb, buf)
            if j >= _PLAIN_AFTER:  # late tiles: few rows improve, plain amin then their argmin
                tmin = tile.amin(dim=1)
                rows = torch.nonzero(tmin < best).view(-1)
                if rows.numel():
                    best_i.index_copy_(0, rows, tile.index_select(0, rows).argmin(dim=1).add_(k0))
                torch.minimum(best, tmin, out=best)
                continue
            chunks = tile.view(r * groups, chunk)
            cmin = chunks.amin(dim=1).view(r, groups)
            tmin = cmin.amin(dim=1)
            if best is None:  # the first code block (k0 = 0): every row takes its index here
                ch = cmin.argmin(dim=1)  # the first chunk holding the row's minimum
                at = chunks.index_select(0, first_chunk[:r] + ch).argmin(dim=1)
                best_i.copy_(at.add_(ch, alpha=chunk))
                best = tmin
                continue
            rows = torch.nonzero(tmin < best).view(-1)  # strict: earlier blocks keep exact ties
            if rows.numel():
                ch = cmin.index_select(0, rows).argmin(dim=1)
                at = chunks.index_select(0, rows * groups + ch).argmin(dim=1)
                best_i.index_copy_(0, rows, at.add_(ch, alpha=chunk).add_(k0))
            torch.minimum(best, tmin, out=best)
        if not all_finite:
            best_i.masked_fill_(~row_finite[n0:n1], 0)
        if gather_into_zq:
            c_q = torch.index_select(codebook, 0, best_i, out=z_q[n0:n1])
        else:
            c_q = codebook.index_select(0, best_i)
            z_q[n0:n1] = c_q
        diff = z_in - c_q.to(torch.float32)
        torch.sum(diff.mul_(diff), dim=1, out=err[n0:n1])

    starts = range(0, n, bn)
    workers = min(threads, len(starts))
    if workers <= 1:
        buf = torch.empty(0 if ops.onednn else bn * bk)
        for n0 in starts:
            row_block(n0, buf)
    else:
        _run_threaded(row_block, starts, workers, threads, 0 if ops.onednn else bn * bk)
    return indices, z_q, err


def _run_threaded(row_block, starts, workers: int, threads: int, buf_numel: int) -> None:
    """Row blocks pulled from one shared queue by ``workers`` threads, one intra-op thread each.

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL thread count, and a global
    default that threads started later pick up; the calling thread restores it when all are done.
    """
    todo = iter(starts)
    lock = threading.Lock()

    def work() -> None:
        torch.set_num_threads(1)
        buf = torch.empty(buf_numel)
        while True:
            with lock:
                n0 = next(todo, None)
            if n0 is None:
                return
            row_block(n0, buf)

    try:
        with concurrent.futures.ThreadPoolExecutor(workers - 1) as pool:
            futures = [pool.submit(work) for _ in range(workers - 1)]
            work()
            for f in futures:
                f.result()  # re-raises a worker's exception
    finally:
        torch.set_num_threads(threads)


def _search_sync_free(z2d, codebook, block_n, block_k):
    """Accelerators without Triton: no host sync, so every row takes the tile's argmin."""
    n, _ = z2d.shape
    k = codebook.shape[0]
    dev = z2d.device
    indices = torch.empty(n, dtype=torch.int64, device=dev)
    if POISON_OUTPUTS:
        indices.fill_(-1)
    scale, row_finite = scale_and_row_finite(z2d, codebook)
    codes, norms = sanitize_codes(codebook.to(torch.float32), scale)
    codes_t = codes.t()
    z_in32 = z2d.to(torch.float32)
    z32 = torch.where(row_finite[:, None], z_in32 * scale, torch.zeros((), device=dev))
    bn = min(block_n, n)
    bk = min(block_k, k)
    buf = torch.empty(bn, bk, dtype=torch.float32, device=dev)
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        zb = z32[n0:n1]
        best = torch.full((n1 - n0,), float("inf"), device=dev)
        best_i = torch.zeros(n1 - n0, dtype=torch.int64, device=dev)
        for k0 in range(0, k, bk):
            k1 = min(k0 + bk, k)
            tile = buf[: n1 - n0, : k1 - k0]
            torch.addmm(norms[k0:k1], zb, codes_t[:, k0:k1], beta=1.0, alpha=-2.0, out=tile)
            tmin, targ = tile.amin(dim=1), tile.argmin(dim=1)  # first occurrence on ties
            better = tmin < best  # strict: the earlier (lower-index) block keeps exact ties
            best_i = torch.where(better, targ + k0, best_i)
            best = torch.where(better, tmin, best)
        indices[n0:n1] = best_i
    indices.masked_fill_(~row_finite, 0)

    z_q32 = codebook.index_select(0, indices).to(torch.float32)
    err = (z_in32 - z_q32).square().sum(dim=1)
    return indices, z_q32.to(z2d.dtype), err
