"""Seeded random streams: one ``torch.Generator`` per purpose and device, created in one place.

Every random choice that writes module state (dead-code restart, quantize dropout, k-means, the
SimVQ basis) draws from a stream named here, seeded from the module's ``seed`` and, where ranks
must differ, its rank. Per-call draws that activation checkpointing must replay (sampled codes,
the orthogonal loss's code subset) do not: they draw from torch's global RNG, which checkpointing
restores before it recomputes a forward.

The seeds are the ones fastvq has always used, so seeded outputs stay bit-identical across
versions::

    purpose            device   seed
    restart-shared     codes'   seed * 1000003          the same on every rank
    restart-local      codes'   seed * 1000003 + 1 + rank
    quantize-dropout   cpu      seed * 1000003          ResidualVQ's active depths
    simvq-basis        cpu      seed * 1000003 + 7      drawn once, at construction
    codes-init         cpu      seed * 1000003 + chunk  the sharded codebook's initial codes,
                                                        one stream per chunk of codes
    kmeans             cpu      seed                    a fresh stream per k-means run

A module that owns streams exposes them as its ``random_streams`` attribute; the training
application saves and restores them with :meth:`RandomStreams.state` and
:meth:`RandomStreams.load_state`, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import torch

_OFFSETS = {
    "restart-shared": 0, "restart-local": 1, "quantize-dropout": 0, "simvq-basis": 7,
    "codes-init": 0,
}  # fmt: skip
# Streams with one member per rank (restart-local) or per index (codes-init's chunks).
_PER_MEMBER = {"restart-local", "codes-init"}


def stream_seed(seed: int, purpose: str, member: int = 0) -> int:
    """The seed of stream ``purpose`` for a module seeded ``seed``; ``member`` is the rank for
    ``restart-local``, the chunk for ``codes-init`` (the table above)."""
    if purpose == "kmeans":
        return seed
    if purpose not in _OFFSETS:
        raise ValueError(f"unknown random stream {purpose!r}; known: kmeans, {', '.join(_OFFSETS)}")
    return seed * 1000003 + _OFFSETS[purpose] + (member if purpose in _PER_MEMBER else 0)


def fresh_generator(seed: int, purpose: str, device="cpu", member: int = 0) -> torch.Generator:
    """A new generator for a one-off draw (k-means, the SimVQ basis, initial codes): never
    cached."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose, member))


class RandomStreams:
    """A module's persistent generators, one per ``(purpose, device)``, seeded on first use.

    Args:
        seed: the owning module's seed.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._gens: dict[tuple[str, str], torch.Generator] = {}

    def get(self, purpose: str, device, rank: int = 0) -> torch.Generator:
        """The generator of ``purpose`` on ``device``; ``rank`` seeds the per-rank streams (it is
        read on first use only: a module's rank does not change)."""
        key = (purpose, str(device))
        gen = self._gens.get(key)
        if gen is None:
            gen = fresh_generator(self.seed, purpose, device, member=rank)
            self._gens[key] = gen
        return gen

    def state(self) -> list[tuple[str, str, torch.Tensor]]:
        """``[(purpose, device, generator state)]`` of every stream used so far."""
        return [(p, dev, g.get_state()) for (p, dev), g in self._gens.items()]

    def load_state(self, items) -> None:
        """Restore what :meth:`state` returned (streams not listed start afresh when used)."""
        for purpose, dev, blob in items:
            stream_seed(self.seed, purpose)  # ValueError for a name this version does not know
            gen = torch.Generator(device=dev)
            gen.set_state(blob)
            self._gens[(purpose, str(dev))] = gen

    def __len__(self) -> int:
        return len(self._gens)


# Per-call streams: seeded from torch's global CPU RNG at each call, as dropout draws, so that
# activation checkpointing (which restores that RNG before it recomputes a forward) replays the
# forward's choices in any order of recomputation; the CPU draw never syncs a device.
_PER_CALL_OFFSETS = {
    "sample-codes": 11,
    "orthogonal-subset": 13,
    "fsq-noise": 17,
    "lfq-entropy-rows": 23,
}
_PER_RANK = (
    "sample-codes",
    "fsq-noise",
    "lfq-entropy-rows",
)  # per-row noise: independent on every rank


def per_call_generator(purpose: str, device, rank: int = 0) -> torch.Generator:
    """A generator for one call's random choices: ``sample-codes`` and ``fsq-noise`` (FSQ's noise
    dropout) and ``lfq-entropy-rows`` (LFQ's row fraction), offset by ``rank`` so rows at the same
    position on two ranks get independent draws, or ``orthogonal-subset``."""
    offset = _PER_CALL_OFFSETS[purpose] + (rank if purpose in _PER_RANK else 0)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator(device).manual_seed(seed + offset)
