"""``VectorQuantizer``: the drop-in VQ layer, built on the fused op (no N x K tensor anywhere).

Forward pipeline for ``x`` of shape ``(..., dim)`` (or ``(B, dim, ...)`` with ``channel_first``)::

    z  = project_in(x)                      (N, heads * codebook_dim)   identity when not needed
    zh = z.view(N, heads, codebook_dim)     one search per codebook (shared: heads folded into N)
    idx, z_q = nearest code                 fastvq.vector_quantize (gradient codebook) or
                                            fastvq.search (EMA codebook, masked rows)
    quantized = project_out(z_q)            forward value exactly the code, gradient straight to x

Codebook learning (training mode only, once per forward, never inside autograd's backward, so the
recomputation of activation checkpointing does not update twice):
    * ``ema=True``: counts n_k and sums s_k from one scatter (``fastvq.code_counts`` /
      ``fastvq.scatter_rows``), all-reduced under DDP, then
      N_k <- g N_k + (1-g) n_k,  m_k <- g m_k + (1-g) s_k,
      c_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N); the loss is beta * commitment only.
    * ``ema=False``: the codebook is an ``nn.Parameter`` trained by the loss's codebook term.
    * k-means init on the first training batch (gathered from every rank under DDP).
    * dead-code restart: a code unused for ``dead_code_steps`` consecutive training steps is
      re-seeded from this step's encoder outputs plus a little noise, with ``torch.where`` on
      device every step (no host sync).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import codebook as cb_engine
from ._checks import FLOAT_DTYPES, check_same_device
from .codebook import CodebookState, row_counts
from .functional import check_beta, quantize_rows
from .ops import resolve_backend


class QuantizeOutput(NamedTuple):
    """Unpacks as ``(quantized, indices, loss)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor


class CodebookStats(NamedTuple):
    """Per-batch codebook statistics (0-dim fp32 tensors on the layer's device, no host sync)."""

    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram), mean over codebooks
    used_fraction: torch.Tensor  # fraction of codes picked by at least one row of the batch
    counts: torch.Tensor  # fp32 (num_codebooks, K) rows per code in this batch


class QuantizeOutputWithStats(NamedTuple):
    """``forward(..., return_stats=True)``: ``(quantized, indices, loss, stats)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: CodebookStats


def check_input(x, dim: int, channel_first: bool) -> None:
    """TypeError/ValueError naming ``x`` for a non-tensor, non-float or wrongly laid-out input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if channel_first:
        if x.dim() < 2:
            raise ValueError(
                f"x must have shape (B, dim, ...) with channel_first=True, got {tuple(x.shape)}"
            )
        if x.shape[1] != dim:
            hint = " (is x channel-last? use channel_first=False)" if x.shape[-1] == dim else ""
            raise ValueError(
                f"x has {x.shape[1]} channels in dim 1 but the layer's dim is {dim}; "
                f"got x of shape {tuple(x.shape)}{hint}"
            )
    else:
        if x.dim() < 1:
            raise ValueError("x must have shape (..., dim), got a 0-dim tensor")
        if x.shape[-1] != dim:
            hint = (
                " (is x channel-first? use channel_first=True)"
                if x.dim() >= 3 and x.shape[1] == dim
                else ""
            )
            raise ValueError(
                f"x has {x.shape[-1]} channels in its last dim but the layer's dim is "
                f"{dim}; got x of shape {tuple(x.shape)}{hint}"
            )


def check_mask(mask, lead: tuple) -> None:
    """TypeError/ValueError unless ``mask`` is a bool tensor of shape ``lead``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (True = real token)")
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(
            f"mask must have x's shape without the channel dim, {tuple(lead)}; "
            f"got {tuple(mask.shape)}"
        )


def check_config(dim, codebook_size, heads, codebook_dim, decay, beta, w_cb, dead_steps) -> int:
    """ValueError/TypeError for a bad layer argument; returns ``codebook_dim`` resolved."""
    for name, v in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if codebook_dim is None:
        if dim % heads != 0:
            raise ValueError(
                f"dim ({dim}) must be divisible by heads ({heads}), or pass codebook_dim"
            )
        codebook_dim = dim // heads
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    check_beta(beta)
    if not w_cb > 0:
        raise ValueError(f"codebook_loss_weight must be > 0, got {w_cb}")
    if dead_steps < 0:
        raise ValueError(f"dead_code_steps must be >= 0, got {dead_steps}")
    return codebook_dim


def check_indices(indices, heads: int, codebook_size: int, check: bool) -> None:
    """TypeError/ValueError for indices that :meth:`VectorQuantizer.codes_from_indices` cannot
    decode; ``check`` also checks their range (a host sync)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if heads > 1 and (indices.dim() < 1 or indices.shape[-1] != heads):
        raise ValueError(
            f"indices must have a trailing dim of size heads={heads}, "
            f"got shape {tuple(indices.shape)}"
        )
    if check and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(
                f"indices must lie in [0, {codebook_size}), got values in [{lo}, {hi}]"
            )


# What every rank must agree on: the shape and sequence of the layer's collectives (K, dims,
# heads, EMA, restart, k-means state) and their result (decay, eps, seed, noise).
_RANK_FIELDS = (
    "dim", "codebook_size", "codebook_dim", "heads", "num_codebooks", "ema", "cosine",
    "channel_first", "_initted", "kmeans_iters", "dead_code_steps", "decay", "eps",
    "restart_noise", "seed", "debug",
)  # fmt: skip


class VectorQuantizer(nn.Module):
    """Vector quantization layer with EMA or gradient codebooks, k-means init and dead-code restart.

    Args:
        dim: channels of the input.
        codebook_size: K, codes per codebook.
        beta: commitment weight (loss = codebook term + beta * commitment; EMA: beta * commitment).
        codebook_loss_weight: weight of the codebook term (gradient codebooks; taming's and
            diffusers' ``legacy=True`` loss is ``beta=1, codebook_loss_weight=their beta``).
        ema: learn the codebook by exponential moving averages (True) or by gradient (False).
        decay: EMA decay gamma.
        eps: EMA Laplace smoothing epsilon.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means.
        dead_code_steps: re-seed a code unused for this many training steps (0 = never).
        restart_noise: relative std of the noise added to a re-seeded code.
        codebook_dim: dimension of the codes; a linear projection in and out when
            ``heads * codebook_dim != dim``. Default ``dim // heads``.
        heads: split each vector into ``heads`` sub-vectors, each quantized separately
            (``indices`` gains a trailing dim of size ``heads``).
        shared_codebook: with ``heads > 1``, one codebook for all heads instead of one per head.
        cosine: l2-normalise inputs and codes (nearest code by cosine similarity).
        rotation_trick: the gradient reaching the input through ``quantized`` is the rotation
            trick's (Fifty et al. 2024: ``sg(lambda R) z``, R rotating ``z``'s direction onto
            its code's) instead of straight-through; the forward value stays the code. With
            ``cosine`` it acts on the normalised rows.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        backend: "auto", "torch" or "triton", for the search and the scatters.
        sync_distributed: all-reduce statistics across ranks when torch.distributed is initialised.
        process_group: the group to synchronise over (default: the default group).
        seed: seed of the generators used by dead-code restart and k-means (identical on every
            rank, so every rank makes the same choices).
        debug: under torch.distributed, check that every rank agrees on the layer's
            configuration (and k-means state) at every training forward (one small all-gather
            and a host sync each). Without it the check runs at the first training forward only.
    """

    def __init__(
        self, dim: int, codebook_size: int, *, beta: float = 0.25,
        codebook_loss_weight: float = 1.0, ema: bool = True, decay: float = 0.99,
        eps: float = 1e-5, kmeans_init: bool = True, kmeans_iters: int = 10,
        dead_code_steps: int = 20, restart_noise: float = 0.01, codebook_dim: int | None = None,
        heads: int = 1, shared_codebook: bool = False, cosine: bool = False,
        channel_first: bool = False, backend: str = "auto", sync_distributed: bool = True,
        process_group=None, seed: int = 0, debug: bool = False, rotation_trick: bool = False,
    ):  # fmt: skip
        super().__init__()
        codebook_dim = check_config(
            dim, codebook_size, heads, codebook_dim, decay, beta, codebook_loss_weight,
            dead_code_steps,
        )  # fmt: skip
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.heads, self.shared_codebook = heads, shared_codebook
        self.num_codebooks = 1 if (shared_codebook or heads == 1) else heads
        self.beta, self.ema, self.decay, self.eps = float(beta), ema, decay, eps
        self.codebook_loss_weight = float(codebook_loss_weight)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_steps, self.restart_noise = dead_code_steps, restart_noise
        self.cosine, self.channel_first, self.backend = cosine, channel_first, backend
        self.sync_distributed, self.process_group, self.seed = sync_distributed, process_group, seed
        if not isinstance(rotation_trick, bool):
            raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
        self.debug, self.rotation_trick = debug, rotation_trick
        self._ranks_checked = False  # the cross-rank check has run (host flag: no sync)

        inner = heads * codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        init = torch.empty(self.num_codebooks, codebook_size, codebook_dim)
        for i in range(self.num_codebooks):
            nn.init.kaiming_uniform_(init[i])
        init = F.normalize(init, dim=-1) if cosine else init
        cb_engine.register_state(self, init, ema=ema, initted=not kmeans_init)
        self.register_buffer("last_perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("last_used_fraction", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, heads={self.heads}, ema={self.ema}, "
            f"beta={self.beta}, kmeans_init={self.kmeans_init}, "
            f"dead_code_steps={self.dead_code_steps}, cosine={self.cosine}, "
            f"rotation_trick={self.rotation_trick}, channel_first={self.channel_first}"
        )

    def _state(self) -> CodebookState:
        return CodebookState(
            self.codebook.data, getattr(self, "cluster_size", None),
            getattr(self, "embed_avg", None), self.steps_unused, self.usage_counts, self.initted,
        )  # fmt: skip

    def _dist_policy(self) -> dict:
        return cb_engine.dist_policy(self.sync_distributed, self.process_group)

    # A host sync: under torch.compile it runs eagerly (a graph break on the calls that check).
    @torch.compiler.disable
    def _check_ranks(self) -> None:
        """ValueError on every rank when ranks disagree on anything that fixes the shape or the
        sequence of this layer's collectives or its result (see ``_RANK_FIELDS``)."""
        cb_engine.check_ranks("VectorQuantizer", self, _RANK_FIELDS, self._dist_policy()["group"])

    def get_codebook(self) -> torch.Tensor:
        """The codes searched, ``(K, codebook_dim)`` (or ``(heads, K, codebook_dim)`` when each
        head has its own codebook); l2-normalised when ``cosine``."""
        cb = self._codes_all()
        return cb[0] if self.num_codebooks == 1 else cb

    def _codes_all(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.cosine and not self.ema else self.codebook

    @torch.no_grad()
    def load_codebook(self, weight: torch.Tensor) -> None:
        """Set the codes from ``weight`` (K, codebook_dim) or (num_codebooks, K, codebook_dim).

        Resets the EMA statistics to match, marks the layer initialised (no k-means) and clears
        the dead-code counters.
        """
        cb_engine.load_codes_(self._state(), weight, normalize=self.cosine and self.ema)
        self._initted = True

    def _rows(self, zh: torch.Tensor, valid: torch.Tensor | None) -> list:
        """Per codebook ``(rows (M, cd), mask (M,) or None)``: shared codebooks fold the heads
        into the rows."""
        if self.num_codebooks == 1:
            keep = None if valid is None else valid.repeat_interleave(self.heads)
            return [(zh.reshape(-1, self.codebook_dim), keep)]
        return [(zh[:, g], valid) for g in range(self.num_codebooks)]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False
    ):
        """Quantize ``x``.

        Args:
            x: ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``; fp32/fp16/bf16.
            mask: optional bool, ``x``'s shape without the channel dim; True = real token. Masked
                rows still get their nearest code but count neither in the loss nor in the EMA,
                usage or dead-code statistics, whatever they hold (NaN/Inf padding included).
                Unmasked rows holding NaN/Inf make the loss NaN/Inf but are left out of those
                statistics and of k-means init.
            return_stats: also return :class:`CodebookStats` of this batch.

        Returns:
            ``QuantizeOutput(quantized, indices, loss)``: ``quantized`` like ``x`` (forward value
            the codes, gradient straight through to ``x``), ``indices`` int64 with ``x``'s shape
            without the channel dim (plus a trailing ``heads`` dim when ``heads > 1``), ``loss``
            an fp32 scalar. With ``return_stats``: ``(quantized, indices, loss, stats)``.
        """
        check_input(x, self.dim, self.channel_first)
        check_same_device("x", x, "codebook", self.codebook)
        if mask is not None:
            check_mask(mask, x.movedim(1, -1).shape[:-1] if self.channel_first else x.shape[:-1])
        backend = resolve_backend(self.backend, x.device)  # once: the rows below go 2-D
        if self.channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        lead = x.shape[:-1]
        n = math.prod(lead)
        valid = None if mask is None else mask.reshape(n)  # bool (N,), True = real token
        z = self.project_in(x.reshape(n, self.dim))
        groups = self._rows(z.reshape(n, self.heads, self.codebook_dim), valid)
        update = self.training and not cb_engine.in_backward()
        pol = self._dist_policy()
        if update and pol["distributed"] and (self.debug or not self._ranks_checked):
            self._check_ranks()
        if update and not self._initted:
            self._initted = cb_engine.kmeans_init_(
                self, self._state(), [zg for zg, _ in groups], [m for _, m in groups], **pol
            )

        w_cb = 0.0 if self.ema else self.codebook_loss_weight
        k, codes = self.codebook_size, self._codes_all()
        if update and self.ema:  # the backward reads the codes this forward used, not the update
            codes = codes.clone()
        out = []  # per codebook: (q, idx, loss, counts, sums, rows, weights)
        for g, (zg, mg) in enumerate(groups):
            if self.cosine:
                zg = F.normalize(zg, dim=-1)
            q, idx, loss, err = quantize_rows(
                zg,
                codes[g],
                beta=self.beta,
                backend=backend,
                keep=mg,
                codebook_weight=w_cb,
                rotation_trick=self.rotation_trick,
            )
            # err is non-finite exactly for rows holding NaN/Inf: they count in no statistic
            ok = torch.isfinite(err) if mg is None else torch.isfinite(err) & mg
            counts, sums = cb_engine.batch_statistics(
                idx, ok, zg if update and self.ema else None, k, backend
            )
            out.append((q, idx, loss, counts, sums, zg.detach(), ok.to(torch.float32)))
        q, idx, losses, counts, sums, rows, weights = zip(*out, strict=True)
        counts = torch.stack(counts)  # (G, K)
        if update:
            sums = torch.stack(sums) if self.ema else None
            counts = cb_engine.update_(self, self._state(), counts, sums, rows, weights, **pol)
        ppl, used = cb_engine.record_stats_(self.last_perplexity, self.last_used_fraction, counts)

        if len(q) > 1:  # one codebook per head: (N, heads, cd)
            q, idx = (torch.stack(q, dim=1),), (torch.stack(idx, dim=1),)
        quantized = self.project_out(q[0].reshape(n, self.heads * self.codebook_dim)).reshape(
            *lead, self.dim
        )
        indices = idx[0].reshape(*lead, self.heads) if self.heads > 1 else idx[0].reshape(lead)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        if return_stats:
            stats = CodebookStats(ppl, used, counts)
            return QuantizeOutputWithStats(quantized, indices, loss, stats)
        return QuantizeOutput(quantized, indices, loss)

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode indices to the tensor the layer outputs for them (eval mode: bit-identical).

        Args:
            indices: int, the layer's ``indices`` layout: ``(...)``, or ``(..., heads)`` when
                ``heads > 1``.
            check: raise ValueError on indices outside ``[0, codebook_size)`` (a host sync).

        Returns:
            ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``; in the codebook's dtype.
        """
        check_indices(indices, self.heads, self.codebook_size, check)
        q = cb_engine.lookup(self._codes_all(), indices.to(torch.int64), self.heads)
        q = self.project_out(q)
        return q.movedim(-1, 1) if self.channel_first else q

    def get_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of ``x`` (the layer's input layout) as in eval mode, without updating state."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(x).indices
        finally:
            self.train(was)


class UsageMeter:
    """Codebook usage over a fixed evaluation set: feed every batch's indices, then read.

    One batch can use at most N of K codes, so judge usage on a whole evaluation set::

        meter = UsageMeter(vq.codebook_size)
        for x in test_loader:
            meter.update(model.encode(x).indices)
        meter.used_fraction, meter.perplexity

    Counts accumulate on the indices' device (no host sync until read).
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None

    def update(self, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        idx = indices.reshape(-1)
        if mask is not None:  # indices of masked rows go to an extra bin, then dropped
            m = mask.reshape(mask.shape + (1,) * (indices.dim() - mask.dim())).expand_as(indices)
            idx = torch.where(m.reshape(-1), idx, self.codebook_size)
        c = row_counts(idx, self.codebook_size + 1)[: self.codebook_size]
        self.counts = c if self.counts is None else self.counts + c

    @property
    def used_fraction(self) -> float:
        return 0.0 if self.counts is None else float((self.counts > 0).float().mean())

    @property
    def perplexity(self) -> float:
        return 0.0 if self.counts is None else float(cb_engine.perplexity(self.counts[None]))


@torch.no_grad()
def codebook_usage(encode, batches, codebook_size: int) -> dict:
    """Usage of a codebook over an evaluation set.

    Args:
        encode: callable mapping a batch to indices (e.g. ``lambda x: model.encode(x)[1]``).
        batches: iterable of batches.
        codebook_size: K.

    Returns:
        ``{"used_fraction", "used", "perplexity"}`` over all batches.
    """
    meter = UsageMeter(codebook_size)
    for b in batches:
        meter.update(encode(b))
    used = 0 if meter.counts is None else int((meter.counts > 0).sum())
    return {"used_fraction": meter.used_fraction, "used": used, "perplexity": meter.perplexity}
