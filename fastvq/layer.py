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

from . import _dist
from .functional import check_beta, vector_quantize
from .kmeans import kmeans
from .ops import _scatter_rows_unchecked, search

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _in_backward() -> bool:
    """True while autograd's engine runs (e.g. activation checkpointing recomputes a forward)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _sq_err_mean(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean over unmasked rows and dims of (a - b)^2 in fp32; 0 when every row is masked.

    Masked rows are dropped with ``torch.where`` before squaring, not multiplied by a 0/1 weight:
    a masked row holding NaN/Inf (a padding sentinel) would give NaN * 0 = NaN, in the loss and
    in its gradient.
    """
    diff = a.to(torch.float32) - b.to(torch.float32)
    d = a.shape[-1]
    if mask is None:
        return diff.square().sum() / max(diff.numel(), 1)
    diff = torch.where(mask[:, None], diff, 0.0)
    return diff.square().sum() / (mask.sum().clamp_min(1) * d)


class _SearchStraightThrough(torch.autograd.Function):
    """forward(z (M, D), codes (K, D), backend) -> (z_q, indices, err) of ``fastvq.search``;
    backward passes ``z_q``'s gradient straight to ``z``.

    The same gradient as ``z_q + (z - z.detach())``, but the forward value is exactly the code
    for every row: that formula gives NaN for a row holding NaN/Inf (Inf - Inf), which would
    carry a masked padding row's NaN into the output and on into the next layer.
    """

    @staticmethod
    def forward(ctx, z, codes, backend):
        idx, z_q, err = search(z, codes, backend)
        ctx.mark_non_differentiable(idx, err)
        return z_q, idx, err

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, _grad_err):
        return grad_q, None, None


def _counts(idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """fp32 (num_bins,) rows per code: an index_add of ones. ``fastvq.code_counts`` is a bincount,
    which syncs the host on CUDA and breaks ``torch.compile`` graphs (data-dependent shape)."""
    ones = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    return torch.zeros(num_bins, dtype=torch.float32, device=idx.device).index_add_(0, idx, ones)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of ``counts`` (G, K), averaged over G."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).mean()


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
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        codebook_loss_weight: float = 1.0,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 20,
        restart_noise: float = 0.01,
        codebook_dim: int | None = None,
        heads: int = 1,
        shared_codebook: bool = False,
        cosine: bool = False,
        channel_first: bool = False,
        backend: str = "auto",
        sync_distributed: bool = True,
        process_group=None,
        seed: int = 0,
        debug: bool = False,
    ):
        super().__init__()
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
        if not codebook_loss_weight > 0:
            raise ValueError(f"codebook_loss_weight must be > 0, got {codebook_loss_weight}")
        if dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0, got {dead_code_steps}")
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.heads, self.shared_codebook = heads, shared_codebook
        self.num_codebooks = 1 if (shared_codebook or heads == 1) else heads
        self.beta, self.ema, self.decay, self.eps = float(beta), ema, decay, eps
        self.codebook_loss_weight = float(codebook_loss_weight)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_steps, self.restart_noise = dead_code_steps, restart_noise
        self.cosine, self.channel_first, self.backend = cosine, channel_first, backend
        self.sync_distributed, self.process_group, self.seed = sync_distributed, process_group, seed
        self.debug = debug
        self._ranks_checked = False  # the cross-rank check has run (host flag: no sync)

        inner = heads * codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()

        g, k, cd = self.num_codebooks, codebook_size, codebook_dim
        init = torch.empty(g, k, cd)
        for i in range(g):
            nn.init.kaiming_uniform_(init[i])
        if cosine:
            init = F.normalize(init, dim=-1)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(g, k))
            self.register_buffer("embed_avg", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("steps_unused", torch.zeros(g, k, dtype=torch.int64))
        self.register_buffer("usage_counts", torch.zeros(g, k))  # running, over training batches
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._initted = not kmeans_init  # host mirror of ``initted``: no sync per forward
        self.register_buffer("last_perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("last_used_fraction", torch.zeros(()), persistent=False)
        self._generators: dict = {}
        self.register_load_state_dict_post_hook(VectorQuantizer._after_load)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module._initted = bool(module.initted)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, heads={self.heads}, ema={self.ema}, "
            f"beta={self.beta}, kmeans_init={self.kmeans_init}, "
            f"dead_code_steps={self.dead_code_steps}, cosine={self.cosine}, "
            f"channel_first={self.channel_first}"
        )

    def _group(self):
        return self.process_group if self.sync_distributed else None

    def _distributed(self) -> bool:
        return self.sync_distributed and _dist.is_distributed(self.process_group)

    def _generator(self, name: str, device: torch.device, offset: int = 0) -> torch.Generator:
        key = (name, str(device))
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed * 1000003 + offset)
            self._generators[key] = gen
        return gen

    # A host sync: under torch.compile it runs eagerly (a graph break on the calls that check).
    @torch.compiler.disable
    def _check_ranks(self) -> None:
        """ValueError on every rank when ranks disagree on anything that fixes the shape or the
        sequence of this layer's collectives (K, dims, heads, EMA, restart, k-means state) or its
        result (decay, eps, seed, noise)."""
        fields = {
            "dim": self.dim, "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim, "heads": self.heads,
            "num_codebooks": self.num_codebooks, "ema": self.ema, "cosine": self.cosine,
            "channel_first": self.channel_first, "kmeans initialised": self._initted,
            "kmeans_iters": self.kmeans_iters, "dead_code_steps": self.dead_code_steps,
            "decay": self.decay, "eps": self.eps, "restart_noise": self.restart_noise,
            "seed": self.seed, "debug": self.debug,
        }  # fmt: skip
        _dist.check_same_across_ranks(
            "VectorQuantizer", fields, self.codebook.device, self._group()
        )
        self._ranks_checked = True

    def get_codebook(self) -> torch.Tensor:
        """The codes searched, ``(K, codebook_dim)`` (or ``(heads, K, codebook_dim)`` when each
        head has its own codebook); l2-normalised when ``cosine``."""
        cb = self._codes_all()
        return cb[0] if self.num_codebooks == 1 else cb

    def _codes_all(self) -> torch.Tensor:
        cb = self.codebook
        if self.cosine and not self.ema:
            cb = F.normalize(cb, dim=-1)
        return cb

    @torch.no_grad()
    def load_codebook(self, weight: torch.Tensor) -> None:
        """Set the codes from ``weight`` (K, codebook_dim) or (num_codebooks, K, codebook_dim).

        Resets the EMA statistics to match, marks the layer initialised (no k-means) and clears
        the dead-code counters.
        """
        weight = torch.as_tensor(weight)
        if weight.dim() == 2:
            weight = weight.unsqueeze(0).expand(self.num_codebooks, -1, -1)
        if tuple(weight.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"weight must have shape {tuple(self.codebook.shape[1:])} or "
                f"{tuple(self.codebook.shape)}, got {tuple(weight.shape)}"
            )
        weight = weight.to(self.codebook)
        if self.cosine and self.ema:
            weight = F.normalize(weight, dim=-1)
        self.codebook.data.copy_(weight)
        if self.ema:
            self.cluster_size.fill_(1.0)
            self.embed_avg.copy_(weight)
        self.steps_unused.zero_()
        self.initted.fill_(True)
        self._initted = True

    # --- input checks and layout -------------------------------------------------------------

    def _check_x(self, x) -> None:
        check_input(x, self.dim, self.channel_first)

    # --- forward -----------------------------------------------------------------------------

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
        self._check_x(x)
        if self.channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        lead = x.shape[:-1]
        n = math.prod(lead)
        valid = None  # bool (N,), True = real token
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = real token)")
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(
                    f"mask must have x's shape without the channel dim, {tuple(lead)}; "
                    f"got {tuple(mask.shape)}"
                )
            valid = mask.reshape(n)

        z = self.project_in(x.reshape(n, self.dim))
        zh = z.reshape(n, self.heads, self.codebook_dim)
        update = self.training and not _in_backward()
        if update and self._distributed() and (self.debug or not self._ranks_checked):
            self._check_ranks()
        if update and not self._initted:
            self._kmeans_init(zh, valid)

        g_count, k = self.num_codebooks, self.codebook_size
        codes = self._codes_all()
        q_parts, idx_parts, losses, counts, sums, rows, weights = [], [], [], [], [], [], []
        for g in range(g_count):
            if g_count == 1:
                zg = zh.reshape(-1, self.codebook_dim)  # (N * heads, cd)
                mg = None if valid is None else valid.repeat_interleave(self.heads)
            else:
                zg, mg = zh[:, g], valid
            if self.cosine:
                zg = F.normalize(zg, dim=-1)
            q, idx, loss, ok = self._quantize(zg, codes[g], mg)
            q_parts.append(q)
            idx_parts.append(idx)
            losses.append(loss)
            # Masked and non-finite rows go to an extra bin K, dropped: they count in no
            # statistic. Their rows are zeroed too, so a NaN never enters a scatter.
            idx_stat = torch.where(ok, idx, k)
            counts.append(_counts(idx_stat, k + 1)[:k])
            if update and self.ema:
                zs = torch.where(ok[:, None], zg.detach(), 0.0)
                sums.append(_scatter_rows_unchecked(idx_stat, zs, k + 1, backend=self.backend)[:k])
            rows.append(zg.detach())
            weights.append(ok.to(torch.float32))

        counts = torch.stack(counts)  # (G, K)
        if update:
            counts = self._update(counts, sums, rows, weights)
        with torch.no_grad():
            stats = CodebookStats(_perplexity(counts), (counts > 0).float().mean(), counts)
            self.last_perplexity.copy_(stats.perplexity)
            self.last_used_fraction.copy_(stats.used_fraction)

        if g_count == 1:
            q = q_parts[0].reshape(n, self.heads * self.codebook_dim)
            indices = idx_parts[0].reshape(n, self.heads)
        else:
            q = torch.stack(q_parts, dim=1).reshape(n, self.heads * self.codebook_dim)
            indices = torch.stack(idx_parts, dim=1)
        quantized = self.project_out(q).reshape(*lead, self.dim)
        indices = indices.reshape(*lead, self.heads) if self.heads > 1 else indices.reshape(lead)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        loss = losses[0] if g_count == 1 else torch.stack(losses).mean()
        if return_stats:
            return QuantizeOutputWithStats(quantized, indices, loss, stats)
        return QuantizeOutput(quantized, indices, loss)

    def _quantize(self, zg: torch.Tensor, cb: torch.Tensor, mg: torch.Tensor | None):
        """(quantized, indices, loss, ok) for rows ``zg`` (M, cd) against codes ``cb`` (K, cd)
        with optional mask ``mg`` (M,); ``ok`` (M,) bool marks the rows that count in the
        statistics: unmasked and finite."""
        w_cb = self.codebook_loss_weight
        if not self.ema and mg is None:
            # the fused op: straight-through, codebook term and commitment in one autograd node;
            # w * (codebook + beta / w * commitment) = w * codebook + beta * commitment
            q, idx, loss = vector_quantize(zg, cb, beta=self.beta / w_cb, backend=self.backend)
            # it returns no per-row error, so one elementwise pass finds the non-finite rows
            ok = torch.isfinite(zg.detach()).all(-1)
            return q, idx, (loss if w_cb == 1.0 else loss * w_cb), ok
        z_q, idx, err = _SearchStraightThrough.apply(zg, cb, self.backend)
        # the per-row error is non-finite exactly for rows holding NaN/Inf (or whose squared
        # error overflows fp32): no extra pass over the rows
        ok = torch.isfinite(err) if mg is None else torch.isfinite(err) & mg
        # unmasked non-finite rows stay in the loss (NaN/Inf): the policy is that they surface
        loss = self.beta * _sq_err_mean(zg, z_q.detach(), mg)
        if not self.ema:  # masked gradient codebook: the codebook term through a gather
            loss = loss + w_cb * _sq_err_mean(zg.detach(), F.embedding(idx, cb), mg)
        return z_q, idx, loss, ok

    # --- codebook learning (training forward only) -------------------------------------------

    @torch.no_grad()
    def _update(self, counts, sums, rows, weights) -> torch.Tensor:
        """EMA, usage and dead-code bookkeeping. Returns the (global) counts."""
        group = self._group()
        dist_on = self._distributed()
        if self.ema:
            stat = torch.cat([torch.stack(sums), counts.unsqueeze(-1)], dim=-1)  # (G, K, cd + 1)
            if dist_on:
                _dist.all_reduce_sum_(stat, group)
            sums, counts = stat[..., :-1], stat[..., -1]
            self.cluster_size.lerp_(counts, 1.0 - self.decay)
            self.embed_avg.lerp_(sums, 1.0 - self.decay)
            self._refresh_codebook()
        elif dist_on:
            counts = _dist.all_reduce_sum_(counts.clone(), group)
        self.usage_counts.add_(counts)
        self.steps_unused.copy_(torch.where(counts > 0, 0, self.steps_unused + 1))
        if self.dead_code_steps > 0:
            self._restart_dead(rows, weights)
        return counts

    def _refresh_codebook(self) -> None:
        total = self.cluster_size.sum(-1, keepdim=True)
        k = self.codebook_size
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total
        cb = self.embed_avg / smoothed.unsqueeze(-1)
        if self.cosine:
            cb = F.normalize(cb, dim=-1)
        self.codebook.copy_(cb)

    def _restart_dead(self, rows: list, weights: list) -> None:
        """Re-seed codes unused for ``dead_code_steps`` steps from this step's rows, on device.

        Each rank samples ``ceil(K / world)`` candidate rows per codebook (uniformly among its
        valid rows, with replacement) and their rank's valid-row count; the candidates of all
        ranks are gathered in rank order (one fixed-size all_gather) and every rank picks the
        same replacement for each code with a generator seeded identically everywhere, each
        rank's candidates weighted by its number of valid rows.
        """
        k, cd = self.codebook_size, self.codebook_dim
        dev = self.codebook.device
        group = self._group()
        world = _dist.world_size(group) if self._distributed() else 1
        rank = _dist.rank(group) if self._distributed() else 0
        p = -(-k // world)
        local_gen = self._generator("restart-local", dev, 1 + rank)
        shared_gen = self._generator("restart-shared", dev, 0)
        cands = []
        for zg, wg in zip(rows, weights, strict=True):
            m = zg.shape[0]
            if m == 0:
                cands.append(torch.zeros(p, cd + 1, device=dev))
                continue
            cdf = torch.cumsum(wg, 0)  # masked and non-finite rows weigh 0: never a candidate
            total = cdf[-1]
            u = torch.rand(p, device=dev, generator=local_gen) * total
            j = torch.searchsorted(cdf, u, right=True).clamp_max(m - 1)
            cand = zg.index_select(0, j).to(torch.float32)
            cands.append(torch.cat([cand, total.expand(p, 1)], dim=1))
        pool = torch.stack(cands, dim=1)  # (P, G, cd + 1)
        if self._distributed():
            pool = _dist.all_gather_cat(pool, group)  # (world * P, G, cd + 1), rank order
        pool = pool.transpose(0, 1)  # (G, S, cd + 1)
        slot_w = pool[..., -1]  # each slot weighted by its rank's valid-row count
        cdf = torch.cumsum(slot_w, -1)
        total = cdf[:, -1:]  # (G, 1)
        u = torch.rand(self.num_codebooks, k, device=dev, generator=shared_gen) * total
        pick = torch.searchsorted(cdf, u, right=True).clamp_max(pool.shape[1] - 1)  # (G, K)
        repl = torch.gather(pool[..., :-1], 1, pick.unsqueeze(-1).expand(-1, -1, cd))
        noise = torch.randn(repl.shape, device=dev, generator=shared_gen)
        scale = repl.square().mean(-1, keepdim=True).sqrt()
        repl = repl + self.restart_noise * scale * noise
        if self.cosine:
            repl = F.normalize(repl, dim=-1)
        dead = (self.steps_unused >= self.dead_code_steps) & (total > 0)  # (G, K)
        dead3 = dead.unsqueeze(-1)
        self.codebook.data.copy_(torch.where(dead3, repl.to(self.codebook.dtype), self.codebook))
        if self.ema:
            self.embed_avg.copy_(torch.where(dead3, repl, self.embed_avg))
            self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))
        self.steps_unused.copy_(torch.where(dead, 0, self.steps_unused))

    # k-means (host syncs, data-dependent shapes, a generator) cannot trace: under torch.compile
    # it runs eagerly, one graph break on the first training forward only (``_initted`` is a
    # Python bool, so later calls recompile once without this branch).
    @torch.compiler.disable
    @torch.no_grad()
    def _kmeans_init(self, zh: torch.Tensor, valid: torch.Tensor | None) -> None:
        """k-means on this batch's unmasked, finite rows, gathered from every rank; the same
        result everywhere."""
        group = self._group()
        dist_on = self._distributed()
        gen = torch.Generator().manual_seed(self.seed)
        new = []
        for g in range(self.num_codebooks):
            if self.num_codebooks == 1:
                sample = zh.reshape(-1, self.codebook_dim)
                keep = None if valid is None else valid.repeat_interleave(self.heads)
            else:
                sample, keep = zh[:, g], valid
            finite = torch.isfinite(sample).all(-1)  # a NaN row would make a NaN centre
            keep = finite if keep is None else keep & finite
            sample = sample[keep].to(torch.float32).contiguous()  # a one-off host sync
            if dist_on:
                sample = _dist.all_gather_varsize(sample, group)
            if sample.shape[0] == 0:  # no data anywhere yet: try again next batch
                return
            centres, _ = kmeans(
                sample,
                self.codebook_size,
                iters=self.kmeans_iters,
                cosine=self.cosine,
                generator=gen,
                backend=self.backend,
            )
            new.append(centres)
        new = torch.stack(new)
        if dist_on:  # identical inputs give identical centres; broadcast guards against atomics
            _dist.broadcast_(new, 0, group)
        self.codebook.data.copy_(new.to(self.codebook.dtype))
        if self.ema:
            self.embed_avg.copy_(new)
            self.cluster_size.fill_(1.0)
        self.initted.fill_(True)
        self._initted = True

    # --- decoding ----------------------------------------------------------------------------

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode indices to the tensor the layer outputs for them (eval mode: bit-identical).

        Args:
            indices: int, the layer's ``indices`` layout: ``(...)``, or ``(..., heads)`` when
                ``heads > 1``.
            check: raise ValueError on indices outside ``[0, codebook_size)`` (a host sync).

        Returns:
            ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``; in the codebook's dtype.
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if (
            indices.dtype.is_floating_point
            or indices.dtype.is_complex
            or indices.dtype == torch.bool
        ):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if self.heads > 1 and (indices.dim() < 1 or indices.shape[-1] != self.heads):
            raise ValueError(
                f"indices must have a trailing dim of size heads={self.heads}, "
                f"got shape {tuple(indices.shape)}"
            )
        if check and indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]"
                )
        indices = indices.to(torch.int64)
        cb = self._codes_all()  # (G, K, cd)
        if self.heads == 1:
            q = F.embedding(indices, cb[0])  # (..., cd)
        elif self.num_codebooks == 1:
            q = F.embedding(indices, cb[0]).flatten(-2)  # (..., heads * cd)
        else:
            offs = torch.arange(self.heads, device=indices.device) * self.codebook_size
            q = F.embedding(indices + offs, cb.reshape(-1, self.codebook_dim)).flatten(-2)
        q = self.project_out(q)
        if self.channel_first:
            q = q.movedim(-1, 1)
        return q

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
        c = _counts(idx, self.codebook_size + 1)[: self.codebook_size]
        self.counts = c if self.counts is None else self.counts + c

    @property
    def used_fraction(self) -> float:
        return 0.0 if self.counts is None else float((self.counts > 0).float().mean())

    @property
    def perplexity(self) -> float:
        return 0.0 if self.counts is None else float(_perplexity(self.counts[None]))


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
