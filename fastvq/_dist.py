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


def all_gather_varsize(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``t`` (n_r, ...) from every rank along dim 0, in rank order; n_r may differ.

    Two collectives: the sizes (a host sync, fine outside the hot path: k-means init), then the
    rows padded to the largest size.
    """
    if not is_distributed(group):
        return t
    r = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(n) for _ in range(r)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    padded = t.new_zeros((m, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(r)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


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
