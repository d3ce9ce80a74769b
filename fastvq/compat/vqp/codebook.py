"""vqp's ``Codebook`` as fastvq's :class:`~fastvq.codebook.Codebook` with vqp's policies: a
table of vqp's names and defaults and a ``state_dict`` key map, nothing else (the rules are
:mod:`fastvq.codebook.vqp_rules`)."""

from __future__ import annotations

import torch
from torch import nn

from ...codebook import Codebook, batch_statistics
from ...codebook.vqp_rules import l2norm
from ...ops import resolve_backend

__all__ = ["VqpCodebook"]


class VqpCodebook(Codebook):
    """fastvq's :class:`~fastvq.codebook.Codebook` with vqp's policies, under vqp's names: the
    codes ``embed`` (G, K, d) (an ``nn.Parameter`` when learnable, a buffer otherwise),
    ``cluster_size`` (G, K), ``embed_avg`` (G, K, d), ``initted`` (attributes and ``state_dict``
    keys). Only names and defaults are mapped here; the rules are
    :mod:`fastvq.codebook.vqp_rules`."""

    KEYS = {"codebook": "embed"}  # fastvq's state name -> vqp's

    def __init__(
        self, dim, codebook_size, *, num_codebooks=1, kmeans_init=False, kmeans_iters=10,
        decay=0.8, eps=1e-5, threshold_ema_dead_code=0, reset_cluster_size=None,
        learnable_codebook=False, ema_update=True, manual_ema_update=False,
        use_cosine_sim=False, use_ddp=False, backend="auto",
    ):  # fmt: skip
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:  # vqp's init: kaiming-uniform over the whole (G, K, d) tensor
            embed = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim))
            embed = l2norm(embed) if use_cosine_sim else embed
        super().__init__(
            num_codebooks, codebook_size, dim, init=embed, decay=decay, eps=eps,
            cosine=use_cosine_sim, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            counters=False, backend=backend, sync_distributed=use_ddp, ema_rule="vqp",
            restart_rule="vqp", kmeans_rule="vqp", dead_code_threshold=threshold_ema_dead_code,
            reset_cluster_size=reset_cluster_size, smooth_each_step=not manual_ema_update,
            parameter=learnable_codebook,
        )  # fmt: skip
        self.ema_update, self.learnable_codebook = ema_update, learnable_codebook
        self.register_state_dict_post_hook(_to_vqp_keys)
        self.register_load_state_dict_pre_hook(_from_vqp_keys)

    @property
    def embed(self) -> torch.Tensor:
        return self.codebook

    def update_ema(self) -> None:
        """vqp's name for :meth:`~fastvq.codebook.Codebook.smooth_`: the codes from the EMA
        statistics now (with ``manual_ema_update=True``, vqp's ``vq._codebook.update_ema()``)."""
        self.smooth_()

    @property
    def threshold_ema_dead_code(self) -> float:
        return self.dead_code_threshold

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.dead_code_threshold > 0

    @torch.no_grad()
    def set_embed_(self, codes: torch.Tensor) -> None:
        """vqp's ``codebook`` setter: the codes only (its statistics and flag stay)."""
        self.codebook.copy_(codes)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x) if self.cosine else x

    @torch.no_grad()
    def update_(self, rows, idx, mask=None, weight=None, accumulate=False, ema_update=None):
        """vqp's ``update_codebook``: this batch's counts and sums of ``rows`` (G, M, d) at
        ``idx`` (G, M) (masked and non-finite rows left out), then the codebook's step."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        ok = torch.isfinite(rows).all(-1)
        ok = ok if mask is None else ok & mask
        be = resolve_backend(self.backend, rows.device)
        stats = [
            batch_statistics(i, o, r, self.codebook_size, be)
            for r, i, o in zip(rows, idx, ok, strict=True)
        ]
        counts = torch.stack([c for c, _ in stats])
        sums = torch.stack([s for _, s in stats])
        keep = [None] * len(rows) if mask is None else mask.float()
        self.step_(
            counts, sums, rows, keep, ema_step=ema_update, ema_weight=weight, accumulate=accumulate
        )


def _to_vqp_keys(module, state_dict, prefix, local_metadata) -> None:
    for ours, theirs in VqpCodebook.KEYS.items():
        if prefix + ours in state_dict:
            state_dict[prefix + theirs] = state_dict.pop(prefix + ours)


def _from_vqp_keys(module, state_dict, prefix, *args) -> None:
    for ours, theirs in VqpCodebook.KEYS.items():
        if prefix + theirs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
