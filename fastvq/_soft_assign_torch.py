"""The pure-torch soft assignment (CPU path, the kernels' twin), tiled over rows and codes.

Same contract as ``fastvq/_soft_assign_triton.py``; ``fastvq/soft_assignment.py`` holds the autograd
Function that calls either. With ``x = sim(z, c) / tau`` (see :func:`tile_logits`) and
``p = softmax_k(x)`` per row, the forward gives per row ``lse``, ``argmax``, ``e = sum_k p x`` and
``q = p @ C``, and per code ``col = sum_n w_n p``. The backward takes the upstream gradients and
recomputes ``p`` tile by tile from the saved ``lse``::

    dL/dx_nk = p'_nk (a_n + g_e_n x_nk + g_q_n . c_k + g_col_k)        p' = w p
    a_n      = g_lse_n + g_e_n (1 - e_n) - g_q_n . q_n - sum_j p'_nj g_col_j

then chains ``dL/dx`` through the similarity. No tensor larger than a (rows x codes) tile exists.
"""

from __future__ import annotations

import torch

SIMILARITIES = ("dot", "neg_l2", "neg_dist")
# fp32 values in one (rows x codes) tile: 4 MiB; a pass holds a few such tiles at once.
TILE_ELEMS = 1 << 20
ROWS_PER_TILE = 512
# exp of these is just above the smallest normal number of each work dtype
EXP_FLOOR = {torch.float32: -87.3, torch.float64: -708.0}


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` in place for ``t <= 0``, its argument floored where fp32 (fp64) leaves its
    normal range: a probability under the smallest normal number (1.2e-38; 2.2e-308 for fp64)
    comes out as about that instead of a subnormal or 0 (as a flush-to-zero GPU would round it,
    and below any tolerance). The CPU exp takes a slow path for arguments that underflow: 5 to 60
    times slower per element, and at a high temperature (the diversity loss's 100) most of them
    do."""
    return t.clamp_(min=EXP_FLOOR[t.dtype]).exp_()


def default_chunk(k: int) -> int:
    """Codes per tile when none is asked for: :data:`TILE_ELEMS` / :data:`ROWS_PER_TILE`."""
    return max(1, min(k, TILE_ELEMS // ROWS_PER_TILE))


def tile_logits(zt, zsq, ct, csq, inv_tau: float, sim: str, eps: float, keep: bool = True):
    """Logits ``x`` (rows x codes) of one tile and the pre-temperature similarity ``s``.

    dot: ``s = z.c``; neg_l2: ``s = -||z - c||^2`` (as ``2 z.c - |z|^2 - |c|^2``); neg_dist:
    ``s = -sqrt(max(||z - c||^2, eps^2))``. Returns ``(x, s, d2)``; ``d2`` (the unclamped squared
    distance, for the clamp's zero slope) only for neg_dist. ``keep=False`` (the caller needs
    ``x`` only, and may overwrite it): one buffer, computed in place, and ``s``, ``d2`` None.
    ``x`` is ``s`` itself at ``inv_tau = 1`` (the product would copy it unchanged).
    """
    dot = zt @ ct.t()
    if sim == "dot":
        s, d2 = dot, None
    else:
        d2 = dot.mul_(-2.0).add_(zsq[:, None]).add_(csq[None, :])  # (|z|^2 + |c|^2) - 2 z.c
        if sim == "neg_l2":
            s, d2 = d2.neg_(), None
        elif keep:
            s = d2.clamp(min=eps * eps).sqrt_().neg_()
        else:
            s, d2 = d2.clamp_(min=eps * eps).sqrt_().neg_(), None
    if not keep:
        return (s if inv_tau == 1.0 else s.mul_(inv_tau)), None, None
    return (s if inv_tau == 1.0 else s * inv_tau), s, d2


def _tiles(n: int, k: int, chunk: tuple[int, int]):
    """``(r0, r1, [(c0, c1), ...])`` per tile of rows, ``chunk = (rows, codes)`` per tile."""
    rows, codes = chunk
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows), [(c0, min(k, c0 + codes)) for c0 in range(0, k, codes)]


def soft_assign_fwd_torch(z, codes, w, inv_tau: float, sim: str, eps: float, chunk: tuple[int, int],
                          want_col: bool, want_q: bool = True, want_e: bool = True):  # fmt: skip
    """Forward over tiles. ``z`` (N, D), ``codes`` (K, D), ``w`` (N,) row weights (1 counted,
    0 masked), all one float dtype (fp32 or fp64). Returns ``(lse, idx, e, ent, q, col)``: (N,),
    int64 (N,), (N,), (N,), (N, D), (K,) (``col`` None unless ``want_col``, ``q`` unless
    ``want_q``, ``e`` and ``ent = lse - e`` unless ``want_e``; ``ent`` is accumulated relative
    to the row max, so it keeps its digits where ``lse`` and ``e`` cancel), and ``lse_lo`` (N,):
    ``lse``'s fp32 rounding error
    ``(max + log(sum)) - lse``, which the backward's ``exp(x - lse)`` applies as the row factor
    ``exp(-lse_lo)`` (free: it rides on the row weights), so ``p`` rounds as with the max and
    the log-sum kept apart. At a high temperature ``|lse|`` is in the hundreds and one ulp of it
    is a relative error of several 1e-6 in every ``p``."""
    n, k = z.shape[0], codes.shape[0]
    dt = z.dtype
    lse = z.new_empty(n)
    lse_lo = z.new_empty(n)
    idx = torch.zeros(n, dtype=torch.int64, device=z.device)
    e = z.new_empty(n) if want_e else None
    ent = z.new_empty(n) if want_e else None
    q = z.new_empty(z.shape) if want_q else None
    zsq, csq = z.square().sum(1), codes.square().sum(1)
    for r0, r1, ctiles in _tiles(n, k, chunk):
        zt, zs = z[r0:r1], zsq[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=dt, device=z.device)
        s = torch.zeros_like(m)
        se = torch.zeros_like(m)
        sq = torch.zeros_like(zt)
        best = torch.full_like(m, float("-inf"))
        bi = torch.zeros((r1 - r0,), dtype=torch.int64, device=z.device)
        for c0, c1 in ctiles:
            ct = codes[c0:c1]
            x, _, _ = tile_logits(zt, zs, ct, csq[c0:c1], inv_tau, sim, eps, keep=False)
            tmax, targ = x.max(dim=1)  # max returns the first maximal index: ties -> lowest
            better = tmax > best  # strict: an earlier tile keeps exact ties
            best = torch.where(better, tmax, best)
            bi = torch.where(better, targ + c0, bi)
            m_new = torch.maximum(m, tmax)
            alpha = torch.exp(m - m_new)
            xm = x.sub_(m_new[:, None])
            # E_p[x - m] reads x - m again; otherwise the exponentials overwrite it
            pe = _exp_(xm.clone() if want_e else xm)
            if want_e:
                # sum exp(x - m) (x - m), rebased on the new max: relative to the row max, not
                # to 0, so that lse - E_p[x] keeps its digits when p is one-hot (both are then
                # the max plus a few ulp); the first tile has s = 0 and m = -inf
                shift = torch.where(s > 0, (m - m_new) * s, 0.0)
                se = (se + shift) * alpha + torch.einsum("ij,ij->i", pe, xm)
            s = s * alpha + pe.sum(1)
            if want_q:
                sq = torch.addmm(sq * alpha[:, None], pe, ct)
            m = m_new
        lg = s.log()
        hi = m + lg
        lse[r0:r1] = hi
        lse_lo[r0:r1] = (m - hi) + lg  # exact when |lg| <= |m| (Fast2Sum); tiny otherwise
        idx[r0:r1] = bi
        if want_e:
            em = se / s  # E_p[x - m]
            e[r0:r1] = m + em
            ent[r0:r1] = (hi - m) - em  # lse - E_p[x], the row entropy; hi - m is exact
        if want_q:
            q[r0:r1] = sq / s[:, None]
    col = None
    if want_col:
        col = codes.new_zeros(k)
        wl = w * torch.exp(-lse_lo)
        for r0, r1, ctiles in _tiles(n, k, chunk):
            zt, zs = z[r0:r1], zsq[r0:r1]
            for c0, c1 in ctiles:
                x, _, _ = tile_logits(zt, zs, codes[c0:c1], csq[c0:c1], inv_tau, sim, eps, False)
                col[c0:c1] += wl[r0:r1] @ _exp_(x.sub_(lse[r0:r1, None]))
    return lse, idx, e, ent, q, col, lse_lo


def _chain(h, zt, ct, s, d2, sim: str, eps: float):
    """From ``h = dL/ds`` (rows x codes) to the tile's ``(dz, dc)`` through the similarity."""
    if sim == "dot":
        return h @ ct, h.t() @ zt
    if sim == "neg_l2":  # ds/dz = 2 (c - z), ds/dc = 2 (z - c)
        return 2.0 * (h @ ct - zt * h.sum(1)[:, None]), 2.0 * (h.t() @ zt - ct * h.sum(0)[:, None])
    # neg_dist: ds/dz = (z - c) / s, ds/dc = (c - z) / s; zero slope where the clamp holds
    h = h.div_(s).masked_fill_(d2 < eps * eps, 0.0)
    return zt * h.sum(1)[:, None] - h @ ct, ct * h.sum(0)[:, None] - h.t() @ zt


def _upstream(p, a, x, ge, gq, g_col, ct, c0: int, c1: int, inv_tau: float):
    """``dL/dx = p (a + g_e (x - lse) + g_q . c + g_col) / tau`` of a tile from its weighted ``p``
    (a new buffer: ``p`` is read again for the codes' own term of ``q``); ``x`` here is
    ``x - lse``."""
    if gq is not None:
        inner = torch.addmm(a[:, None], gq, ct.t())
    elif ge is None and g_col is not None:
        inner = a[:, None] + g_col[c0:c1][None, :]
    else:
        inner = a[:, None].expand(-1, c1 - c0).clone()
    if ge is not None:
        inner.addcmul_(ge, x)
    if g_col is not None and (gq is not None or ge is not None):
        inner += g_col[c0:c1][None, :]
    h = inner.mul_(p)
    return h if inv_tau == 1.0 else h.mul_(inv_tau)


def soft_assign_bwd_torch(z, codes, w, lse, a0, g_e, g_q, g_col, inv_tau: float, sim: str,
                          eps: float, chunk: tuple[int, int], need_z: bool, need_c: bool,
                          value_grad: bool = True, lse_lo=None):  # fmt: skip
    """Gradients ``(dz, dc)`` from the upstream ones. ``a0 = g_lse + g_e (1 + ent) - g_q . q``
    (N,) is the row constant without the column-sum term (``ent = lse - e``; the element term is
    ``g_e (x - lse)``); ``g_e`` (N,), ``g_q`` (N, D) and
    ``g_col`` (K,), each None when that output has no gradient (its work is skipped). Rows with
    weight 0 get no gradient and give none to the codes. ``value_grad=False`` leaves out the
    codes' direct term ``p^T g_q`` of ``q = p C`` (the gradient of ``p @ sg(C)``). ``lse_lo``
    (N,) is the forward's rounding error of ``lse`` (None: 0)."""
    n, k = z.shape[0], codes.shape[0]
    dz, dc = torch.zeros_like(z), torch.zeros_like(codes)
    if not (need_z or need_c) or n == 0:
        return dz, dc
    zsq, csq = z.square().sum(1), codes.square().sum(1)
    wl = w if lse_lo is None else w * torch.exp(-lse_lo)
    for r0, r1, ctiles in _tiles(n, k, chunk):
        zt, zs, wt = z[r0:r1], zsq[r0:r1], wl[r0:r1, None]
        lt = lse[r0:r1, None]
        ge = None if g_e is None else g_e[r0:r1, None]
        gq = None if g_q is None else g_q[r0:r1]
        a = a0[r0:r1].clone()
        if g_col is not None:  # the column sums' row term needs a pass of its own
            for c0, c1 in ctiles:
                x, _, _ = tile_logits(zt, zs, codes[c0:c1], csq[c0:c1], inv_tau, sim, eps, False)
                a -= _exp_(x.sub_(lt)).mul_(wt) @ g_col[c0:c1]
        # only lse's gradient: dL/dx is p times a row constant, one product with the weights
        row = (wt * a[:, None] * inv_tau) if ge is None and gq is None and g_col is None else None
        for c0, c1 in ctiles:
            ct = codes[c0:c1]
            x, s, d2 = tile_logits(zt, zs, ct, csq[c0:c1], inv_tau, sim, eps)
            # x - lse, not x, in E_p[x]'s term (a0 holds g_e (1 + lse - E_p[x])): near the max
            # both stay small and exact, where x and E_p[x] would cancel
            x = x - lt  # a new buffer: x may be s itself (temperature 1)
            p = _exp_(x.clone() if ge is not None else x)
            if row is not None:
                h = p.mul_(row)
            else:
                h = _upstream(p.mul_(wt), a, x, ge, gq, g_col, ct, c0, c1, inv_tau)
                if need_c and value_grad and gq is not None:
                    dc[c0:c1].addmm_(p.t(), gq)  # q = p C: the codes' own term
            gz_t, gc_t = _chain(h, zt, ct, s, d2, sim, eps)
            if need_z:
                dz[r0:r1] += gz_t
            if need_c:
                dc[c0:c1] += gc_t
    return dz, dc
