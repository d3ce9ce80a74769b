"""torch.distributed helpers for the layer: every function is a no-op when not distributed.

The rule that keeps data-parallel training from hanging: every rank calls the same helpers in the
same order with tensors of the same shape, whatever its data (an empty or fully masked batch
contributes zeros, never skips a call). Only ``all_gather_varsize`` accepts per-rank sizes; it
exchanges the sizes first.

All helpers take an optional ``group`` (default: the default process group). Nothing here
communicates N x K tensors: the layer reduces its (K,) counts and (K, D) sums, and gathers
fixed-size candidate samples.
"""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (identity when not distributed). Returns ``t``."""
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank along dim 0, in rank order."""
    if not is_distributed(group):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as uint8 (last dim times itemsize): any dtype travels
    bit-exact, and gloo needs no support for it."""
    return t.contiguous().view(torch.uint8)


def all_gather_padded(
    t: torch.Tensor, sizes: list[int], group=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every rank's ``t`` (sizes[r], ...) concatenated along dim 0 in rank order, bit-exact.

    ``sizes`` (one int per rank, the same list everywhere) must be known already. One all-gather
    of the rows padded to ``max(sizes)``, sent as bytes. Returns ``(rows (sum(sizes), ...), pos)``
    where ``pos`` int64 holds the real rows' positions in the padded ``(R * max, ...)`` layout
    (None when every rank sent ``max(sizes)`` rows).
    """
    world, n_max, n = len(sizes), max(sizes), t.shape[0]
    if n == n_max:
        padded = t
    else:
        padded = t.new_zeros((n_max, *t.shape[1:]))
        padded[:n] = t
    gathered = t.new_empty((world * n_max, *t.shape[1:]))
    if n_max > 0:
        _all_gather_single(as_bytes(gathered), as_bytes(padded), group=group)
    if all(s == n_max for s in sizes):
        return gathered, None
    pos = torch.cat([torch.arange(s, device=t.device) + r * n_max for r, s in enumerate(sizes)])
    return gathered.index_select(0, pos), pos


def reduce_scatter_owned_(recv: torch.Tensor, send: torch.Tensor, group=None) -> torch.Tensor:
    """``recv`` (n, ...) <- this rank's block of ``send`` (R * n, ...) summed over ranks, as
    bytes: a bitwise copy where exactly one rank's block is non-zero (its owner)."""
    _reduce_scatter_single(as_bytes(recv), as_bytes(send), op=dist.ReduceOp.SUM, group=group)
    return recv


def all_gather_varsize(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``t`` (n_r, ...) from every rank along dim 0, in rank order; n_r may differ.

    Two collectives: the sizes (a host sync, fine outside the hot path: k-means init), then the
    rows padded to the largest size.
    """
    if not is_distributed(group):
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = all_gather_cat(n, group).tolist()
    return all_gather_padded(t, sizes, group)[0]


def broadcast_(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` (identity when not distributed)."""
    if is_distributed(group):
        dist.broadcast(t, src=src, group=group)
    return t


def _as_int(v) -> int:
    """An int that equals across ranks exactly when ``v`` does (a float by its fp64 bits)."""
    if isinstance(v, float):
        return struct.unpack("<q", struct.pack("<d", v))[0]
    return int(v)


def check_same_across_ranks(what: str, fields: dict, device, group=None) -> None:
    """ValueError on every rank when the ranks of ``group`` disagree on any of ``fields``.

    ``fields`` maps names to ints, bools or floats; every rank must pass the same names in the
    same order (the same code does). One all-gather of ``len(fields)`` int64 and a host sync, so
    callers run it once, or on every call only when debugging. Every rank sees the same table and
    raises the same error, so no rank is left waiting in a collective. No-op when not distributed.
    """
    if not is_distributed(group):
        return
    names = list(fields)
    mine = torch.tensor([[_as_int(fields[n]) for n in names]], dtype=torch.int64, device=device)
    table = all_gather_cat(mine, group).tolist()  # (R, F), rank order
    bad = [i for i in range(len(names)) if len({row[i] for row in table}) > 1]
    if bad:
        detail = "; ".join(
            f"{names[i]}: {[_decode(row[i], fields[names[i]]) for row in table]}" for i in bad
        )
        raise ValueError(
            f"{what}: the ranks disagree on {detail} (values in rank order). Every rank must "
            "build the layer with the same arguments and call it the same number of times; "
            "otherwise the collectives mix tensors of different layouts."
        )


def _decode(encoded: int, like):
    """Decode one gathered field for the error message (floats travel as their fp64 bits)."""
    if isinstance(like, float):
        return struct.unpack("<d", struct.pack("<q", encoded))[0]
    if isinstance(like, bool):
        return bool(encoded)
    return encoded
