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
    * ``simvq=True``: the codes are a frozen basis times a learned map, a gradient codebook whose
      (K, cd) product goes through the same fused route.

Manual control (``freeze_codebook``, per-call ``ema_update``, ``decay=1``,
:meth:`VectorQuantizer.update_codebook_from_indices`), auxiliary losses
(:mod:`fastvq.codebook_losses`), sampled codes and ``topk`` (:mod:`fastvq.sampling`; sampled codes
go through :func:`~fastvq.functional.quantize_rows` with given ``indices``): see
docs/layer.md, "Codebook methods".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist
from . import codebook as cb_engine
from ._checks import FLOAT_DTYPES, check_nonneg_real, check_same_device
from .codebook import CodebookState, row_counts
from .codebook_losses import ce_commitment_loss, diversity_loss, orthogonal_loss
from .functional import check_beta, quantize_rows, vq_loss
from .ops import resolve_backend
from .sampling import sample_codes, topk_codes


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


class LossBreakdown(NamedTuple):
    """The terms of the layer's loss as they enter it (weights applied, averaged over codebooks
    like the loss): ``loss == codebook + commitment + orthogonal + diversity`` up to rounding.
    Detached fp32 0-dim tensors, for logging; a term that is off is 0."""

    commitment: torch.Tensor  # beta * mse(z, sg(z_q)), or beta * cross entropy (ce commitment)
    codebook: torch.Tensor  # codebook_loss_weight * mse(sg(z), z_q); 0 for EMA / frozen codes
    orthogonal: torch.Tensor  # orthogonal_reg_weight * orthogonal_loss(codes)
    diversity: torch.Tensor  # codebook_diversity_loss_weight * diversity_loss(z, codes)


class QuantizeOutputWithBreakdown(NamedTuple):
    """``forward(..., return_loss_breakdown=True)``: ``(quantized, indices, loss, breakdown)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: LossBreakdown


class QuantizeOutputFull(NamedTuple):
    """``forward(..., return_stats=True, return_loss_breakdown=True)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: CodebookStats
    breakdown: LossBreakdown


def _check_weight(name: str, v) -> float:
    """A finite real ``>= 0`` as a float; TypeError/ValueError naming ``name``."""
    check_nonneg_real(name, v)
    return float(v)


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


def resolve_simvq(simvq, ema, kmeans_init, dead_code_steps) -> tuple[bool, bool, int]:
    """``(ema, kmeans_init, dead_code_steps)`` with the defaults resolved: ``True, True, 20``,
    or ``False, False, 0`` with ``simvq``; ValueError naming an explicit argument SimVQ cannot
    take. SimVQ is a gradient codebook (its codes are a frozen basis times a learned map): an EMA
    cannot write a product, k-means centres cannot be written into a frozen random basis, and a
    restart would have to rewrite the frozen basis, which the method exists to avoid (every code
    moves with the shared map, so none is left behind)."""
    if not isinstance(simvq, bool):
        raise TypeError(f"simvq must be a bool, got {simvq!r}")
    if not simvq:
        return (
            True if ema is None else ema,
            True if kmeans_init is None else kmeans_init,
            20 if dead_code_steps is None else dead_code_steps,
        )
    bad = [
        name
        for name, v in (("ema=True", ema), ("kmeans_init=True", kmeans_init))
        if v is not None and v
    ]
    if dead_code_steps is not None and dead_code_steps != 0:
        bad.append(f"dead_code_steps={dead_code_steps}")
    if bad:
        raise ValueError(
            f"simvq=True is a gradient codebook (codes = frozen basis x learned map) and cannot "
            f"take {', '.join(bad)}: leave them unset (SimVQ defaults: ema=False, "
            f"kmeans_init=False, dead_code_steps=0)"
        )
    return False, False, 0


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
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (1 = a frozen EMA codebook), got {decay}")
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
# heads, EMA, restart, k-means state, this call's ema_update) and their result (decay, eps, seed,
# noise). A frozen call (freeze_codebook), like eval, issues no collective and is not checked.
_RANK_FIELDS = (
    "dim", "codebook_size", "codebook_dim", "heads", "num_codebooks", "ema", "cosine",
    "channel_first", "_initted", "kmeans_iters", "dead_code_steps", "decay", "eps",
    "restart_noise", "seed", "debug", "simvq", "_call_ema_step",
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
        decay: EMA decay gamma in [0, 1]; 1 freezes an EMA codebook (its EMA buffers and codes
            stay bit-identical; k-means init and dead-code restart still write codes when on).
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
            its code's) instead of straight-through; the forward value stays the code. Masked
            rows and rows holding NaN/Inf pass straight through. With
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
        simvq: SimVQ (Zhu et al. 2024, arXiv 2411.02038): the codes are a frozen random basis
            ``simvq_basis`` (num_codebooks, K, codebook_dim) (a buffer, ``randn / sqrt(cd)``
            drawn from ``seed``) times a learned map ``simvq_map`` (num_codebooks, cd, cd), an
            ``nn.Parameter`` applied as a bias-free ``nn.Linear`` (its init):
            ``codes = basis @ map.T``. A gradient codebook: the loss's codebook term reaches the
            map through the (K, cd) product. Defaults ``ema=False, kmeans_init=False,
            dead_code_steps=0``; setting any of them otherwise is a ValueError.
        freeze_codebook: no codebook update of any kind in training forwards (no EMA, k-means
            init, restart or usage bookkeeping) and no gradient to the codes (the loss is then
            ``beta`` * commitment only); the per-call ``forward(freeze_codebook=...)`` overrides.
        ema: default True (False with ``simvq``); kmeans_init: default True (False with
            ``simvq``); dead_code_steps: default 20 (0 with ``simvq``).
        orthogonal_reg_weight: weight of :func:`fastvq.codebook_losses.orthogonal_loss` of the
            codes (Shin et al. 2021), added to the loss. Needs a gradient codebook (``ema=False``
            or ``simvq``): an EMA codebook takes no gradient, so the term could not act.
        orthogonal_reg_active_codes_only: only the codes this batch used (every rank's rows in
            training) enter it; a boolean selection, so a host sync on CUDA.
        orthogonal_reg_max_codes: at most this many codes (a random subset drawn from the
            layer's seeded generator) enter it.
        codebook_diversity_loss_weight: weight of :func:`fastvq.codebook_losses.diversity_loss`
            (minus the entropy of the batch's mean soft assignment), per codebook, over the
            unmasked rows (a mask costs a host sync here: the rows are selected).
        codebook_diversity_temperature: its temperature (vqp's default 100).
        commitment_use_cross_entropy_loss: the commitment term is ``beta`` times
            :func:`fastvq.codebook_losses.ce_commitment_loss` of the chosen codes instead of
            ``beta * mse(z, sg(z_q))`` (the codes are detached in it: like the commitment term
            it trains the encoder; a gradient codebook keeps its own codebook term).
        stochastic_sample_codes: in training forwards, each row's code is sampled from
            ``softmax(-||z - c_k|| / sample_codebook_temp)`` (vqp's Gumbel sampling;
            :func:`fastvq.sampling.sample_codes`) instead of the nearest; the loss, the output
            and the codebook statistics use the sampled code. Eval forwards take the nearest.
        sample_codebook_temp: that temperature (0 = the nearest code).
    """

    def __init__(
        self, dim: int, codebook_size: int, *, beta: float = 0.25,
        codebook_loss_weight: float = 1.0, ema: bool | None = None, decay: float = 0.99,
        eps: float = 1e-5, kmeans_init: bool | None = None, kmeans_iters: int = 10,
        dead_code_steps: int | None = None, restart_noise: float = 0.01,
        codebook_dim: int | None = None, heads: int = 1, shared_codebook: bool = False,
        cosine: bool = False, channel_first: bool = False, backend: str = "auto",
        sync_distributed: bool = True, process_group=None, seed: int = 0, debug: bool = False,
        rotation_trick: bool = False, simvq: bool = False, freeze_codebook: bool = False,
        orthogonal_reg_weight: float = 0.0, orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None, codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        commitment_use_cross_entropy_loss: bool = False, stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
    ):  # fmt: skip
        super().__init__()
        ema, kmeans_init, dead_code_steps = resolve_simvq(simvq, ema, kmeans_init, dead_code_steps)
        self.orthogonal_reg_weight = _check_weight("orthogonal_reg_weight", orthogonal_reg_weight)
        if self.orthogonal_reg_weight > 0 and ema:
            raise ValueError(
                "orthogonal_reg_weight > 0 needs a gradient codebook (ema=False or simvq=True): "
                "an EMA codebook takes no gradient, so the regulariser could not act on it"
            )
        if orthogonal_reg_max_codes is not None and (
            isinstance(orthogonal_reg_max_codes, bool)
            or not isinstance(orthogonal_reg_max_codes, int)
            or orthogonal_reg_max_codes < 1
        ):
            raise ValueError(
                f"orthogonal_reg_max_codes must be None or an int >= 1, got "
                f"{orthogonal_reg_max_codes!r}"
            )
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = _check_weight(
            "codebook_diversity_loss_weight", codebook_diversity_loss_weight
        )
        self.codebook_diversity_temperature = _check_weight(
            "codebook_diversity_temperature", codebook_diversity_temperature
        )
        self.commitment_use_cross_entropy_loss = bool(commitment_use_cross_entropy_loss)
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.sample_codebook_temp = _check_weight("sample_codebook_temp", sample_codebook_temp)
        if not isinstance(freeze_codebook, bool):
            raise TypeError(f"freeze_codebook must be a bool, got {freeze_codebook!r}")
        self.simvq, self.freeze_codebook = simvq, freeze_codebook
        self._call_ema_step = True  # this call's ema_update, for the cross-rank check
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
        cb_engine.register_state(self, init, ema=ema, initted=not kmeans_init, codes=not simvq)
        if simvq:
            # vqp's SimVQ: basis randn * cd^-0.5, map nn.Linear(cd, cd, bias=False). The basis is
            # drawn from ``seed`` (not the global RNG), so every rank holds the same one.
            gen = torch.Generator().manual_seed(seed * 1000003 + 7)
            basis = torch.randn(init.shape, generator=gen) * codebook_dim**-0.5
            self.register_buffer("simvq_basis", basis)
            w = torch.empty(self.num_codebooks, codebook_dim, codebook_dim)
            for i in range(self.num_codebooks):
                nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))  # nn.Linear's weight init
            self.simvq_map = nn.Parameter(w)
        self.register_buffer("last_perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("last_used_fraction", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, heads={self.heads}, ema={self.ema}, "
            f"beta={self.beta}, kmeans_init={self.kmeans_init}, "
            f"dead_code_steps={self.dead_code_steps}, cosine={self.cosine}, "
            f"rotation_trick={self.rotation_trick}, channel_first={self.channel_first}"
            + (", simvq=True" if self.simvq else "")
            + (", freeze_codebook=True" if self.freeze_codebook else "")
        )

    def __getattr__(self, name: str):
        if name == "codebook" and self.__dict__.get("simvq"):
            raise AttributeError(
                "with simvq=True the codes are computed (simvq_basis @ simvq_map.T): read them "
                "with get_codebook(); the learned map is simvq_map, the frozen basis simvq_basis"
            )
        return super().__getattr__(name)

    def _codes_tensor(self) -> torch.Tensor:
        """The tensor holding the codebook state (SimVQ: its basis), for device and state."""
        return self.simvq_basis if self.simvq else self.codebook

    def _state(self) -> CodebookState:
        # SimVQ has no EMA, restart or k-means: the engine only keeps its usage counters, and
        # the basis stands in for the codes (never written).
        return CodebookState(
            self._codes_tensor().data, getattr(self, "cluster_size", None),
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
        """(num_codebooks, K, codebook_dim) the codes searched, differentiable for a gradient
        codebook (SimVQ: the K x cd product, through which the map gets its gradient)."""
        cb = self.simvq_basis @ self.simvq_map.mT if self.simvq else self.codebook
        return F.normalize(cb, dim=-1) if self.cosine and not self.ema else cb

    @torch.no_grad()
    def load_codebook(self, weight: torch.Tensor) -> None:
        """Set the codes from ``weight`` (K, codebook_dim) or (num_codebooks, K, codebook_dim).

        Resets the EMA statistics to match, marks the layer initialised (no k-means) and clears
        the dead-code counters. SimVQ: the basis becomes ``weight`` and the map the identity, so
        ``get_codebook()`` returns ``weight`` exactly and training then learns a linear map of
        the loaded codes (optimizer moments of the map are kept).
        """
        cb_engine.load_codes_(self._state(), weight, normalize=self.cosine and self.ema)
        if self.simvq:
            eye = torch.eye(self.codebook_dim, dtype=self.simvq_map.dtype)
            self.simvq_map.copy_(eye.expand_as(self.simvq_map))
        self._initted = True

    def _rows(self, zh: torch.Tensor, valid: torch.Tensor | None) -> list:
        """Per codebook ``(rows (M, cd), mask (M,) or None)``: shared codebooks fold the heads
        into the rows."""
        if self.num_codebooks == 1:
            keep = None if valid is None else valid.repeat_interleave(self.heads)
            return [(zh.reshape(-1, self.codebook_dim), keep)]
        return [(zh[:, g], valid) for g in range(self.num_codebooks)]

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor | None):
        """Check ``x`` and ``mask`` and cut ``x`` into rows: ``(backend, lead, n, groups)`` with
        ``lead`` x's shape without the channel dim, ``n = prod(lead)`` and ``groups`` as
        :meth:`_rows` (projected, not yet normalised)."""
        check_input(x, self.dim, self.channel_first)
        check_same_device("x", x, "codebook", self._codes_tensor())
        if mask is not None:
            check_mask(mask, x.movedim(1, -1).shape[:-1] if self.channel_first else x.shape[:-1])
        backend = resolve_backend(self.backend, x.device)  # once: the rows below go 2-D
        if self.channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        lead = x.shape[:-1]
        n = math.prod(lead)
        valid = None if mask is None else mask.reshape(n)  # bool (N,), True = real token
        z = self.project_in(x.reshape(n, self.dim))
        return backend, lead, n, self._rows(z.reshape(n, self.heads, self.codebook_dim), valid)

    def _call_flags(self, freeze_codebook, ema_update) -> bool:
        """This call's ``freeze`` (the constructor's unless given); records ``ema_update``."""
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze_codebook must be a bool or None, got {freeze_codebook!r}")
        if ema_update is not None and not isinstance(ema_update, bool):
            raise TypeError(f"ema_update must be a bool or None, got {ema_update!r}")
        if ema_update is False and not self.ema:
            raise ValueError(
                "ema_update=False applies to an EMA codebook (ema=True); this layer's codebook "
                "learns from the loss: use freeze_codebook=True to stop its updates"
            )
        self._call_ema_step = ema_update is not False
        return freeze

    def _generator(self, name: str, device, offset: int) -> torch.Generator:
        return cb_engine.generator(self._generators, self.seed, name, device, offset)

    @staticmethod
    def _call_generator(device, offset: int) -> torch.Generator:
        """A generator for one call's random choices (sampled codes, the orthogonal subset),
        seeded from torch's global CPU RNG, as dropout draws: activation checkpointing restores
        that RNG before it recomputes a forward, so the recomputation makes the forward's
        choices (in any order of recomputation); the CPU draw never syncs a device."""
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return torch.Generator(device).manual_seed(seed + offset)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        freeze_codebook: bool | None = None, ema_update: bool | None = None,
        topk: int | None = None, sample_codebook_temp: float | None = None,
        return_loss_breakdown: bool = False,
    ):  # fmt: skip
        """Quantize ``x``.

        Args:
            x: ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``; fp32/fp16/bf16.
            mask: optional bool, ``x``'s shape without the channel dim; True = real token. Masked
                rows still get their nearest code but count neither in the loss nor in the EMA,
                usage or dead-code statistics, whatever they hold (NaN/Inf padding included).
                Unmasked rows holding NaN/Inf make the loss NaN/Inf but are left out of those
                statistics and of k-means init.
            return_stats: also return :class:`CodebookStats` of this batch.
            freeze_codebook: this call only (default: the constructor's): no codebook update of
                any kind and no gradient to the codes; the loss has no codebook term.
                Under torch.distributed every rank must pass the same (a frozen call issues no
                collective).
            ema_update: False: this training call makes no codebook state step (EMA, usage,
                dead-code counters and restart all stay as they are, as vqp's
                ``ema_update=False``; k-means init still runs on the first training call), for
                :meth:`update_codebook_from_indices` to make it later. EMA codebooks only.
                Under torch.distributed every rank must pass the same.
            topk: ``indices`` become the ``topk`` nearest codes of each row, nearest first (ties
                to the lowest index), a trailing dim of size ``topk``; ``quantized`` and
                ``loss`` are the nearest code's. A query: no sampling and no codebook update.
            sample_codebook_temp: this call's sampling temperature (default the constructor's;
                with ``stochastic_sample_codes``).
            return_loss_breakdown: also return :class:`LossBreakdown`, the loss's terms.

        Returns:
            ``QuantizeOutput(quantized, indices, loss)``: ``quantized`` like ``x`` (forward value
            the codes, gradient straight through to ``x``), ``indices`` int64 with ``x``'s shape
            without the channel dim (plus a trailing ``heads`` dim when ``heads > 1``, then a
            ``topk`` dim), ``loss`` an fp32 scalar. ``return_stats`` adds ``stats`` and
            ``return_loss_breakdown`` adds ``breakdown``, in that order
            (:class:`QuantizeOutputWithStats`, :class:`QuantizeOutputWithBreakdown`,
            :class:`QuantizeOutputFull`).
        """
        freeze = self._call_flags(freeze_codebook, ema_update)
        if topk is not None and (
            isinstance(topk, bool) or not isinstance(topk, int)
            or not 1 <= topk <= self.codebook_size
        ):  # fmt: skip
            raise ValueError(f"topk must be an int in [1, {self.codebook_size}], got {topk!r}")
        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        temp = _check_weight("sample_codebook_temp", temp)
        backend, lead, n, groups = self._prepare(x, mask)
        update = self.training and not freeze and topk is None and not cb_engine.in_backward()
        ema_step = update and self.ema and self._call_ema_step and self.decay < 1.0
        sample = self.training and self.stochastic_sample_codes and topk is None and temp > 0
        pol = self._dist_policy()
        if update and pol["distributed"] and (self.debug or not self._ranks_checked):
            self._check_ranks()
        if update and not self._initted:
            self._initted = cb_engine.kmeans_init_(
                self, self._state(), [zg for zg, _ in groups], [m for _, m in groups], **pol
            )

        k, codes = self.codebook_size, self._codes_all()
        if freeze:  # no gradient to the codes (SimVQ: nor to its map), no codebook term
            codes, w_cb = codes.detach(), 0.0
        else:
            w_cb = 0.0 if self.ema else self.codebook_loss_weight
        if update and self.ema:  # the backward reads the codes this forward used, not the update
            codes = codes.clone()
        ce = self.commitment_use_cross_entropy_loss
        beta_mse = 0.0 if ce else self.beta  # the CE term replaces the MSE commitment
        if sample:  # per rank: rows at the same position on two ranks get independent noise
            gen = self._call_generator("cpu", 11 + _dist.rank(self.process_group))
        out = []  # per codebook: (q, idx, loss, counts, sums, rows, weights, terms, topk)
        for g, (zg, mg) in enumerate(groups):
            if self.cosine:
                zg = F.normalize(zg, dim=-1)
            cg = codes[g]
            if sample:  # the sampled code replaces the nearest: loss, output and statistics
                pick = sample_codes(zg, cg, temperature=temp, generator=gen, cosine=self.cosine)
            else:
                pick = None
            q, idx, loss, err = quantize_rows(
                zg, cg, beta=beta_mse, backend=backend, keep=mg, codebook_weight=w_cb,
                rotation_trick=self.rotation_trick, indices=pick,
            )  # fmt: skip
            # err is non-finite exactly for rows holding NaN/Inf: they count in no statistic
            ok = torch.isfinite(err) if mg is None else torch.isfinite(err) & mg
            counts, sums = cb_engine.batch_statistics(idx, ok, zg if ema_step else None, k, backend)
            ce_term, div_term = self._aux_terms(zg, cg, idx, mg)
            terms = None
            if return_loss_breakdown:  # detached, for logging: (commitment, codebook, diversity)
                mse = vq_loss(err.detach(), zg.shape[1], 1.0, 0.0, mg)[0]
                commit = ce_term.detach() if ce_term is not None else self.beta * mse
                zero = torch.zeros_like(mse)
                div = div_term.detach() if div_term is not None else zero
                terms = torch.stack([commit, w_cb * mse, div])
            for extra in (ce_term, div_term):
                if extra is not None:
                    loss = loss + extra
            near = None if topk is None else topk_codes(zg, cg, topk)[1]
            out.append((q, idx, loss, counts, sums, zg.detach(), ok.to(torch.float32), terms, near))
        q, idx, losses, counts, sums, rows, weights, terms, near = zip(*out, strict=True)
        counts = torch.stack(counts)  # (G, K)
        if update and self._call_ema_step:  # ema_update=False: no state step at all (vqp)
            sums = torch.stack(sums) if ema_step else None
            counts = cb_engine.update_(
                self, self._state(), counts, sums, rows, weights, ema_step=ema_step, **pol
            )
        ppl, used = cb_engine.record_stats_(self.last_perplexity, self.last_used_fraction, counts)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        orth = self._orthogonal_term(codes, counts)
        if orth is not None:
            loss = loss + orth

        if len(q) > 1:  # one codebook per head: (N, heads, cd)
            q, idx = (torch.stack(q, dim=1),), (torch.stack(idx, dim=1),)
        quantized = self.project_out(q[0].reshape(n, self.heads * self.codebook_dim)).reshape(
            *lead, self.dim
        )
        if topk is not None:  # (N [* heads], k) per codebook -> (..., [heads,] k)
            top = near[0] if len(near) == 1 else torch.stack(near, dim=1)
            head = (self.heads,) if self.heads > 1 else ()
            indices = top.reshape(*lead, *head, topk)
        elif self.heads > 1:
            indices = idx[0].reshape(*lead, self.heads)
        else:
            indices = idx[0].reshape(lead)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        stats = CodebookStats(ppl, used, counts) if return_stats else None
        if not return_loss_breakdown:
            if return_stats:
                return QuantizeOutputWithStats(quantized, indices, loss, stats)
            return QuantizeOutput(quantized, indices, loss)
        t = torch.stack(terms).mean(0)  # (3,) averaged over codebooks, like the loss
        orth = torch.zeros_like(t[0]) if orth is None else orth.detach()
        breakdown = LossBreakdown(t[0], t[1], orth, t[2])
        if return_stats:
            return QuantizeOutputFull(quantized, indices, loss, stats, breakdown)
        return QuantizeOutputWithBreakdown(quantized, indices, loss, breakdown)

    def _aux_terms(self, zg, cg, idx, keep) -> tuple:
        """One codebook's loss terms besides the fused op's, with their gradients (None when
        off): ``beta * ce_commitment_loss`` and the weighted ``diversity_loss``."""
        ce = div = None
        if self.commitment_use_cross_entropy_loss:
            # masked rows are ignored (-1) inside the loss: no host sync
            target = idx if keep is None else torch.where(keep, idx, -1)
            ce = self.beta * ce_commitment_loss(zg, cg.detach(), target, cosine=self.cosine)
        if self.codebook_diversity_loss_weight > 0:
            rows = zg if keep is None else zg[keep]  # a boolean selection: a host sync on CUDA
            div = self.codebook_diversity_loss_weight * diversity_loss(
                rows, cg, temperature=self.codebook_diversity_temperature, cosine=self.cosine
            )
        return ce, div

    def _orthogonal_term(self, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``orthogonal_reg_weight * orthogonal_loss`` of ``codes`` (G, K, cd) (None when off); with
        ``orthogonal_reg_active_codes_only`` over the codes with ``counts`` (G, K) > 0 (every
        rank's rows after a training step's all-reduce)."""
        if self.orthogonal_reg_weight == 0:
            return None
        active = None
        if self.orthogonal_reg_active_codes_only:
            active = counts[0] > 0 if codes.shape[0] == 1 else counts > 0
        gen = None
        if self.orthogonal_reg_max_codes is not None:
            gen = self._call_generator(codes.device, 13)
        reg = orthogonal_loss(
            codes[0] if codes.shape[0] == 1 else codes, active=active,
            max_codes=self.orthogonal_reg_max_codes, generator=gen,
        )  # fmt: skip
        return self.orthogonal_reg_weight * reg

    @torch.no_grad()
    def update_codebook_from_indices(
        self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None, *,
        check: bool = True,
    ) -> None:  # fmt: skip
        """One EMA step from given assignments instead of the search's (vqp's ``update_indices``):
        the counts and sums of ``x``'s rows per given index, then the EMA, Laplace smoothing,
        usage and dead-code bookkeeping of a training forward (all-reduced under
        torch.distributed: every rank must call it).

        It runs whatever the module's mode and ``freeze_codebook`` (an explicit request); with
        ``decay=1`` the EMA step is skipped as in a forward. Pair it with
        ``forward(..., ema_update=False)`` to choose when and from which assignments the
        codebook learns (vqp's ``manual_ema_update``); for several micro-batches, concatenate
        their rows and indices and call it once.

        Args:
            x: the layer's input layout, ``(..., dim)`` or ``(B, dim, ...)`` with
                ``channel_first`` (projected, split into heads and normalised as in forward).
            indices: int, the layer's indices layout: ``x``'s shape without the channel dim,
                plus a trailing ``heads`` dim when ``heads > 1``.
            mask: optional bool, ``x``'s shape without the channel dim (True = counts). Rows
                holding NaN/Inf never count.
            check: raise ValueError on indices outside ``[0, codebook_size)`` (a host sync).
        """
        if not self.ema:
            raise ValueError(
                "update_codebook_from_indices updates an EMA codebook (ema=True); this layer's "
                "codebook learns from the loss"
            )
        backend, lead, n, groups = self._prepare(x, mask)
        check_indices(indices, self.heads, self.codebook_size, check)
        want = (*lead, self.heads) if self.heads > 1 else tuple(lead)
        if tuple(indices.shape) != tuple(want):
            raise ValueError(
                f"indices must have shape {tuple(want)} (x's without the channel dim"
                f"{', plus heads' if self.heads > 1 else ''}), got {tuple(indices.shape)}"
            )
        idx = indices.reshape(n, self.heads).to(torch.int64)
        # a shared codebook folds the heads into the rows, row-major like _rows
        idx_groups = [idx.reshape(-1)] if self.num_codebooks == 1 else idx.unbind(1)
        k, ema_step = self.codebook_size, self.decay < 1.0
        counts, sums, rows, weights = [], [], [], []
        for (zg, mg), ig in zip(groups, idx_groups, strict=True):
            zg = F.normalize(zg, dim=-1) if self.cosine else zg
            ok = torch.isfinite(zg).all(-1)
            ok = ok if mg is None else ok & mg
            c, s_ = cb_engine.batch_statistics(ig, ok, zg if ema_step else None, k, backend)
            counts.append(c)
            sums.append(s_)
            rows.append(zg)
            weights.append(ok.to(torch.float32))
        cb_engine.update_(
            self, self._state(), torch.stack(counts), torch.stack(sums) if ema_step else None,
            rows, weights, ema_step=ema_step, **self._dist_policy(),
        )  # fmt: skip

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
