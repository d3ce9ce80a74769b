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
import os
import threading

import torch

# Tile sizes: a tile of 1024 x 512 fp32 distances (2 MiB) stays in the core's cache between the
# addmm that writes it and the min that reads it. Measured single-threaded on the 2-core AMD EPYC
# (N=16384, K=8192, D=64, 2026-11-26, machine shared with other jobs, so +-30% noise): 1024x512
# 470-740 ms, 4096x1024 (16 MiB) 670-1420 ms, faiss IndexFlatL2 470-590 ms. Row-only chunking
# (the whole K per row block) was 2.5x slower at K=65536 in earlier trials.
DEFAULT_BLOCK_N = 1024
DEFAULT_BLOCK_K = 512
# CPU at D >= _ONEDNN_MIN_D (oneDNN's GEMM, whose time dominates there): larger tiles halve the
# per-tile op overhead. 16384 x 8192 x 256, one thread, fresh processes alternated over 4 rounds
# (2026-11-27): median 725 ms with 2048 x 1024 tiles, 741 ms with 1024 x 512 (both with
# reordered weights, see _Codes), faiss 745 ms.
_WIDE_BLOCK_N = 2048
_WIDE_BLOCK_K = 1024
_ONEDNN_MIN_D = 128
# CPU: a tile's minimum is taken per chunk of this many codes (see _search_cpu). Per 1024 x 512
# tile on the 2-core EPYC: amin over chunks of 32 codes ~80-120 us, of 128 ~40 us (of the whole
# 512-code row ~31 us). Improved rows copy their best chunk into a per-row slot, and the first
# position of each row's minimum in its slot (128 codes) ends each row block.
_CHUNK = 128

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
    zero = torch.zeros((), dtype=torch.float32, device=z2d.device)
    row_finite = torch.isfinite(zmax)

    def finite_max(m: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, m, zero).amax(dim=0) if m.numel() else zero

    m = torch.maximum(finite_max(zmax, row_finite), finite_max(cmax, torch.isfinite(cmax)))
    return _scale_of(m), row_finite


def _scale_of(m: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim power of two ``s`` with ``m * s`` in [0.5, 1) (``m`` finite, >= 0)."""
    if torch.compiler.is_exporting():
        return _scale_of_graph(m)
    _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1); m = 0 gives e = 0
    # Built from its bits, so s is exactly 2^-e; the clamp keeps s and 1/s normal fp32 numbers.
    e = e.to(torch.int32).clamp(-126, 126)
    return ((127 - e) << 23).view(torch.float32)


def _scale_of_graph(m: torch.Tensor) -> torch.Tensor:
    """:func:`_scale_of` in ops that ONNX has (no ``frexp``, no bit cast), for exported graphs;
    tests/test_export.py checks that both give the same ``s`` from the smallest subnormal to the
    largest fp32. ``e = floor(log2 m) + 1`` may be off by one near a power of two (log2 rounds):
    the two exact tests below move it to the ``e`` of ``m = f 2^e``, f in [0.5, 1)."""
    e = torch.where(m > 0, torch.floor(torch.log2(m)) + 1, 0.0)
    e = torch.where(m * torch.exp2(-e) >= 1, e + 1, e)
    e = torch.where(m * torch.exp2(-e) < 0.5, torch.where(m > 0, e - 1, e), e)
    return torch.exp2(-e.clamp(-126, 126))


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim max |x| over all of ``x`` (non-empty); NaN or Inf when ``x`` holds one."""
    return torch.maximum(x.amax(), -x.amin()).to(torch.float32)


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
    inf = torch.full((), float("inf"), dtype=torch.float32, device=codebook.device)
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
    zero = torch.zeros((), dtype=torch.float32, device=codebook32.device)
    codes = codebook32 if scale is None else codebook32 * scale
    return torch.where(torch.isfinite(norms)[:, None], codes, zero), norms


@functools.cache
def _onednn_linear_ok() -> bool:
    """True when oneDNN's fused ``X W^T + b`` op (the one inductor uses for CPU linears) runs here.

    It replaces ``addmm`` on CPU for D >= 128: it adds the code norms inside the GEMM (no pass to
    copy them into the tile first) and runs ~8% faster than MKL's sgemm at D=256 on the 2-core AMD
    EPYC. It is a private op, so it is tried once on a small problem; any failure or a wrong value
    means addmm.
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
    """The GEMM operand of every code block, made once per call and shared by all row blocks.

    ``s c`` (``-2 s c`` for oneDNN, which takes the norms as its fused bias) and ``||s c||^2``, as
    :func:`sanitize_codes` gives them, padded to ``kp`` codes: zero codes with an infinite norm,
    never selected. One (kp, D) allocation for ``addmm`` (one (bk, D) block at a time for
    oneDNN) and small chunks for the norms: on the VM measured, a fresh multi-MiB temporary costs
    ~1.4 ms per MiB in page faults, more than its arithmetic. oneDNN's blocks are reordered into
    its blocked weight layout once per call (``bn``: the row block, its batch-size hint): at
    D=256 the GEMMs of a 16384 x 8192 search took ~650 ms instead of ~675 ms, for ~8 ms of
    reordering (2026-11-27, one thread).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        scale: torch.Tensor,
        kp: int,
        bk: int,
        bn: int,
        onednn: bool,
        codes_finite: bool = False,
    ):
        k, d = codebook.shape
        self.onednn = onednn
        norms = torch.full((kp,), float("inf"), dtype=torch.float32)
        starts = range(0, kp, bk)
        if self.onednn:
            # Block by block: the reordered blocks are the only (K, D) copy (no second one
            # alive while they are made).
            reorder = torch.ops.mkldnn._reorder_linear_weight
            ops = []
            for k0 in starts:
                w = torch.zeros(bk, d, dtype=torch.float32)
                self._scaled(codebook[k0 : k0 + bk], scale, w, norms[k0 : min(k0 + bk, k)],
                             codes_finite)  # fmt: skip
                ops.append(reorder(w.mul_(-2.0), bn))  # exact: tile = ||c||^2 + z.(-2c)
        else:
            w = torch.zeros(kp, d, dtype=torch.float32)
            self._scaled(codebook, scale, w, norms[:k], codes_finite)
            w_t = w.t()  # (D, K) view: addmm reads it as a transposed operand, no copy
            ops = [w_t[:, k0 : k0 + bk] for k0 in starts]
        self.blocks = [(k0, op, norms[k0 : k0 + bk]) for k0, op in zip(starts, ops, strict=True)]

    @staticmethod
    def _scaled(codes, scale, w, norms, codes_finite: bool) -> None:
        """``w[:len(codes)] = s c`` and ``norms = ||s c||^2``; a code holding NaN/Inf gets a zero
        row (the GEMM stays finite) and +inf (never selected)."""
        k, d = codes.shape
        c = torch.mul(codes.to(torch.float32), scale, out=w[:k])  # exact: a power of two
        step = max(1, (1 << 16) // max(d, 1))
        for i in range(0, k, step):  # scaled: a finite code's squares cannot overflow
            torch.sum(c[i : i + step].square(), dim=1, out=norms[i : i + step])
        if not codes_finite:
            bad = ~torch.isfinite(norms)
            if bool(bad.any()):
                norms.masked_fill_(bad, float("inf"))
                c.masked_fill_(bad[:, None], 0.0)

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
    block_n: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code by squared L2 for every row, tiled so that no N x K tensor exists.

    Args:
        z2d: (N, D) float tensor, any strides.
        codebook: (K, D) float tensor, K >= 1, same device.
        block_n, block_k: tile sizes (rows x codes) of one distance tile; None: 1024 x 512, or
            on CPU at D >= 128 2048 x 1024.

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
        return _search_sync_free(
            z2d, codebook, block_n or DEFAULT_BLOCK_N, block_k or DEFAULT_BLOCK_K
        )
    return _search_cpu(z2d, codebook, block_n, block_k)


def _cpu_tiles(
    n: int, k: int, d: int, threads: int, block_n: int | None, block_k: int | None
) -> tuple[int, int, bool]:
    """``(rows, codes, wide)`` of the CPU search's tiles; ``wide``: oneDNN's GEMM (D >= 128).

    ``block_n`` / ``block_k`` None take the defaults (1024 x 512, or 2048 x 1024 when wide).
    """
    k32 = -(-k // _CHUNK) * _CHUNK
    # Measured on the 2-core EPYC with the tile's min pass after each GEMM: oneDNN ~10% faster
    # than MKL's addmm at D=256, 25-35% slower at D=64 and 15-25% slower at D=16 and 32.
    wide = d >= _ONEDNN_MIN_D and _onednn_linear_ok()
    default_k = block_k is None
    block_n = block_n or (_WIDE_BLOCK_N if wide else DEFAULT_BLOCK_N)
    block_k = block_k or (_WIDE_BLOCK_K if wide else DEFAULT_BLOCK_K)
    bk = min(block_k, k32)  # a multiple of _CHUNK unless block_k is not
    if default_k and not wide and bk < k32 <= 4 * bk:
        # Up to 2048 codes: one code block of the same area, so each row's index is found once
        # (1024 x 64: 0.95x faiss's time -> 0.92x with two 512-code blocks; 2048: 10% faster).
        block_n, bk = max(1, block_n * bk // k32), k32
    # Split a small batch so that every thread gets a row block (and rows stay cache-sized).
    return max(1, min(block_n, -(-n // threads))), bk, wide


def _first_match(slot: torch.Tensor, best: torch.Tensor, neg_iota: torch.Tensor, out=None):
    """fp32 (rows,) ``j - chunk`` for the first position ``j`` of each row of ``slot`` (rows,
    chunk) equal to ``best`` (rows,); ``neg_iota`` is ``arange(chunk) - chunk``. ``out`` (rows,
    chunk) fp32 scratch, ``slot`` itself by default (overwritten).

    ``eq`` writes 1.0 / 0.0, times ``j - chunk`` the first match is the smallest value, so a
    vectorised ``amin`` finds it: 20-25 us per 512 x 128 slot against 60-91 us for ``argmin``, a
    scalar loop on CPU (one thread, ``benchmarks/cpu_search_parts.py``). Every row must hold its
    ``best`` (no NaN), or its result is -0.0.
    """
    out = slot if out is None else out
    return torch.eq(slot, best[:, None], out=out).mul_(neg_iota).amin(dim=1)


def _search_cpu(z2d, codebook, block_n, block_k):
    """The CPU loop: row blocks on parallel threads, each tile's index from chunk minima.

    - **Index of the minimum.** ``argmin`` over a tile row is a scalar loop on CPU (~20x slower
      than ``amin``). Each tile is viewed as chunks of ``_CHUNK`` codes: ``amin`` per chunk, then
      the tile minimum from those. Only rows whose best improved are touched: ``argmin`` over
      their few chunk minima finds the first chunk holding the minimum, whose distances are
      copied into the row's slot (with the chunk's first code). After the row block's last tile,
      the first slot position equal to the row's minimum (found with ``eq`` and ``amin``, no
      ``argmin``) gives the index. Both steps take the first occurrence and chunks are in code
      order, so exact ties go to the lowest index; across tiles, strict ``<`` keeps the earlier
      one.
    - **Threads.** Many small ops per tile each open an OpenMP region: with T > 1 intra-op threads
      their barriers cost more than they save, and much more on a loaded machine. Instead up to T
      pool threads (the ops release the GIL) each take whole row blocks with one intra-op thread
      (see :func:`_pool`); the caller waits.
    - **Per row block:** the scaled rows, the gathered codes and the error are made one row block
      at a time, so no (N, D) temporary beyond the outputs exists.
    """
    n, d = z2d.shape
    k = codebook.shape[0]
    threads = torch.get_num_threads()
    bn, bk, wide = _cpu_tiles(n, k, d, threads, block_n, block_k)
    chunk = math.gcd(bk, _CHUNK)
    kp = -(-k // bk) * bk  # K padded to whole code blocks: every tile has bk columns

    threaded = threads > 1 and n > bn

    def prepare():
        # Two whole-tensor reductions first (~4x cheaper than the per-row pass on this CPU):
        # when both are finite, every row and code is, and the scale is the same.
        zm, cm = _absmax(z2d), _absmax(codebook)
        if bool(torch.isfinite(zm)) and bool(torch.isfinite(cm)):
            scale = _scale_of(torch.maximum(zm, cm))
            return scale, None, True, _Codes(codebook, scale, kp, bk, bn, wide, codes_finite=True)
        scale, row_finite = scale_and_row_finite(z2d, codebook)
        return scale, row_finite, bool(row_finite.all()), _Codes(codebook, scale, kp, bk, bn, wide)

    # Threaded, the set-up runs on a pool thread too: an OpenMP region in the calling thread would
    # leave its OpenMP worker spinning (milliseconds on this CPU) beside the pool threads.
    setup = _pool()[0].submit(_in_callers_mode(prepare)).result() if threaded else prepare()
    scale, row_finite, all_finite, ops = setup  # all_finite: on CPU no device sync

    indices = torch.empty(n, dtype=torch.int64)
    if POISON_OUTPUTS:
        indices.fill_(-1)
    z_q = torch.empty(z2d.shape, dtype=z2d.dtype)
    err = torch.empty(n, dtype=torch.float32)
    gather_into_zq = codebook.dtype == z2d.dtype

    groups = bk // chunk
    first_chunk = torch.arange(bn) * groups  # row i's chunk 0 in the (r * groups, chunk) view
    neg_iota = torch.arange(chunk, dtype=torch.float32) - chunk  # j - chunk at slot position j

    def row_block(n0: int, buf: torch.Tensor, slot: torch.Tensor, base: torch.Tensor) -> None:
        n1 = min(n0 + bn, n)
        r = n1 - n0
        z_in = z2d[n0:n1].to(torch.float32)
        zb = (z_in * scale).contiguous()  # the GEMM operand
        if not all_finite:  # non-finite rows: zeroed for the GEMM, index 0 below
            zb.masked_fill_(~row_finite[n0:n1, None], 0.0)
        slot, base = slot[:r], base[:r]
        best = None
        for k0, op, nb in ops.blocks:
            tile = ops.tile(zb, op, nb, buf)
            chunks = tile.view(r * groups, chunk)
            cmin = chunks.amin(dim=1).view(r, groups)
            tmin = cmin.amin(dim=1)
            if best is None:  # the first code block (k0 = 0): every row takes its chunk here
                ch = cmin.argmin(dim=1)  # the first chunk holding the row's minimum
                torch.index_select(chunks, 0, first_chunk[:r] + ch, out=slot)
                torch.mul(ch, chunk, out=base)
                best = tmin
                continue
            rows = torch.nonzero(tmin < best).view(-1)  # strict: earlier blocks keep exact ties
            if rows.numel():
                ch = cmin.index_select(0, rows).argmin(dim=1)
                slot.index_copy_(0, rows, chunks.index_select(0, torch.add(ch, rows, alpha=groups)))
                base.index_copy_(0, rows, ch.mul_(chunk).add_(k0))
            torch.minimum(best, tmin, out=best)
        # The slot holds the row's minimum (``best``) exactly: its first position there is the
        # index. Tiles hold no NaN (rows and codes are finite or zeroed, a bad code's norm is
        # +inf), so every row has a match.
        j = _first_match(slot, best, neg_iota)
        best_i = torch.add(base, j.to(torch.int64), out=indices[n0:n1]).add_(chunk)
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
    sizes = (0 if wide else bn * bk, bn, chunk)  # oneDNN allocates its own tiles
    if not threaded:
        bufs = _buffers(*sizes)
        for n0 in starts:
            row_block(n0, *bufs)
    else:
        _run_threaded(row_block, starts, threads, sizes)
    return indices, z_q, err


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE = None, 0  # a forked child has none of the parent's threads
    _POOL_LOCK = threading.Lock()  # nor the thread that may have held the lock at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    """Worker threads kept across calls, each with one intra-op thread, set once.

    A fresh thread's first ops (OpenMP, oneDNN and torch thread-local setup) cost milliseconds, and
    so does ``torch.set_num_threads`` (it also resizes torch's global pthreadpool): done per call,
    either cost as much as a whole small search. ``torch.set_num_threads(1)`` in a worker sets that
    thread's OpenMP/MKL count and a process-wide default (read by threads at their first op, and by
    the pthreadpool); the caller restores the default once, after every worker has set its own.
    """
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None:
            size = max(1, os.cpu_count() or 1)
            pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="fastvq-search")
            # every init task on its own thread; the timeout turns a failed init into an error
            # instead of leaving the others (and this caller) waiting for ever
            barrier = threading.Barrier(size, timeout=60)

            def init() -> None:
                torch.get_num_threads()  # this thread's lazy setup first: it reads the default
                torch.set_num_threads(1)
                barrier.wait()

            threads = torch.get_num_threads()
            try:
                for f in [pool.submit(init) for _ in range(size)]:
                    f.result()
            finally:
                torch.set_num_threads(threads)
            _POOL, _POOL_SIZE = pool, size
        return _POOL, _POOL_SIZE


def _in_callers_mode(fn):
    """``fn`` to run on a pool thread under the caller's inference / grad mode: both are thread
    local, and a pool thread outside inference mode may not write into the caller's outputs when
    they are inference tensors (``torch.inference_mode()`` around the search)."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(*args):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args)

    return run


def _buffers(tile_numel: int, rows: int, chunk: int):
    """One thread's scratch: the distance tile (unless oneDNN allocates it), and per row the
    distances of its best chunk so far and that chunk's first code."""
    return (
        torch.empty(tile_numel, dtype=torch.float32),
        torch.empty(rows, chunk, dtype=torch.float32),
        torch.empty(rows, dtype=torch.int64),
    )


def _run_threaded(row_block, starts, threads: int, sizes: tuple[int, int, int]) -> None:
    """Row blocks pulled from one shared queue by up to ``threads`` pool threads; the caller waits
    (its own intra-op thread count is left alone)."""
    pool, size = _pool()
    todo = iter(starts)
    lock = threading.Lock()

    def work() -> None:
        if torch.get_num_threads() != 1:  # only if something reset this pool thread
            torch.set_num_threads(1)
        bufs = _buffers(*sizes)
        while True:
            with lock:
                n0 = next(todo, None)
            if n0 is None:
                return
            row_block(n0, *bufs)

    work = _in_callers_mode(work)
    futures = [pool.submit(work) for _ in range(min(threads, size, len(starts)))]
    concurrent.futures.wait(futures)
    for f in futures:
        f.result()  # re-raises a worker's exception


def search_graph(z2d: torch.Tensor, codebook: torch.Tensor, block_k: int = DEFAULT_BLOCK_K):
    """:func:`search_torch`'s contract as plain aten ops for ``torch.export`` (and ONNX from it):
    all rows in one block (N may be a symbolic size), the codes in static tiles of ``block_k``.

    z2d: (N, D), codebook: (K, D). Returns ``(indices (N,), z_q (N, D), err (N,))`` as
    :func:`search_torch`, from the same arithmetic as the accelerator path (sync-free argmin).
    """
    return _search_sync_free(z2d, codebook, None, block_k)


def _search_sync_free(z2d, codebook, block_n, block_k):
    """Accelerators without Triton: no host sync, so every row takes the tile's argmin.
    ``block_n`` None: all rows in one block, no loop over N (export, where N is symbolic)."""
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
    z32 = torch.where(
        row_finite[:, None], z_in32 * scale, torch.zeros((), dtype=torch.float32, device=dev)
    )
    bn = n if block_n is None else min(block_n, n)
    bk = min(block_k, k)
    buf = torch.empty(bn, bk, dtype=torch.float32, device=dev)
    for n0 in [0] if block_n is None else range(0, n, bn):
        n1 = n if block_n is None else min(n0 + bn, n)
        zb = z32[n0:n1]
        best = torch.full((n1 - n0,), float("inf"), dtype=torch.float32, device=dev)
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
