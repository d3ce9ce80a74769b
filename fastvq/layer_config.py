"""The options of :class:`~fastvq.layer.VectorQuantizer`, checked and resolved in one place."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

import torch

from ._checks import FLOAT_DTYPES, check_nonneg_real
from .functional import check_beta


@dataclass
class VQConfig:
    """Every option of :class:`~fastvq.layer.VectorQuantizer`, checked (TypeError/ValueError
    naming the argument) and with the defaults resolved when built.

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

    dim: int
    codebook_size: int
    beta: float = 0.25
    codebook_loss_weight: float = 1.0
    ema: bool | None = None  # True, or False with simvq
    decay: float = 0.99
    eps: float = 1e-5
    kmeans_init: bool | None = None  # True, or False with simvq
    kmeans_iters: int = 10
    dead_code_steps: int | None = None  # 20, or 0 with simvq
    restart_noise: float = 0.01
    codebook_dim: int | None = None  # dim // heads
    heads: int = 1
    shared_codebook: bool = False
    cosine: bool = False
    channel_first: bool = False
    backend: str = "auto"
    sync_distributed: bool = True
    process_group: object = None
    seed: int = 0
    debug: bool = False
    rotation_trick: bool = False
    simvq: bool = False
    freeze_codebook: bool = False
    orthogonal_reg_weight: float = 0.0
    orthogonal_reg_active_codes_only: bool = False
    orthogonal_reg_max_codes: int | None = None
    codebook_diversity_loss_weight: float = 0.0
    codebook_diversity_temperature: float = 100.0
    commitment_use_cross_entropy_loss: bool = False
    stochastic_sample_codes: bool = False
    sample_codebook_temp: float = 1.0

    def __post_init__(self):
        self.ema, self.kmeans_init, self.dead_code_steps = resolve_simvq(
            self.simvq, self.ema, self.kmeans_init, self.dead_code_steps
        )
        self.orthogonal_reg_weight = check_weight(
            "orthogonal_reg_weight", self.orthogonal_reg_weight
        )
        if self.orthogonal_reg_weight > 0 and self.ema:
            raise ValueError(
                "orthogonal_reg_weight > 0 needs a gradient codebook (ema=False or simvq=True): "
                "an EMA codebook takes no gradient, so the regulariser could not act on it"
            )
        m = self.orthogonal_reg_max_codes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"orthogonal_reg_max_codes must be None or an int >= 1, got {m!r}")
        self.orthogonal_reg_active_codes_only = bool(self.orthogonal_reg_active_codes_only)
        for name in (
            "codebook_diversity_loss_weight", "codebook_diversity_temperature",
        ):  # fmt: skip
            setattr(self, name, check_weight(name, getattr(self, name)))
        self.commitment_use_cross_entropy_loss = bool(self.commitment_use_cross_entropy_loss)
        self.stochastic_sample_codes = bool(self.stochastic_sample_codes)
        self.sample_codebook_temp = check_weight("sample_codebook_temp", self.sample_codebook_temp)
        if not isinstance(self.freeze_codebook, bool):
            raise TypeError(f"freeze_codebook must be a bool, got {self.freeze_codebook!r}")
        self.codebook_dim = check_config(
            self.dim, self.codebook_size, self.heads, self.codebook_dim, self.decay, self.beta,
            self.codebook_loss_weight, self.dead_code_steps,
        )  # fmt: skip
        self.beta, self.codebook_loss_weight = float(self.beta), float(self.codebook_loss_weight)
        if not isinstance(self.rotation_trick, bool):
            raise TypeError(f"rotation_trick must be a bool, got {self.rotation_trick!r}")

    @classmethod
    def from_options(cls, owner: str, dim, codebook_size, options: dict) -> VQConfig:
        """``VQConfig(dim, codebook_size, **options)``; an unknown option is a TypeError that
        names ``owner`` and the closest option names."""
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TypeError(f"{owner} got an unexpected keyword argument {name!r}{hint}")
        return cls(dim, codebook_size, **options)

    @property
    def num_codebooks(self) -> int:
        """1 when the heads share a codebook (or there is one head), else ``heads``."""
        return 1 if (self.shared_codebook or self.heads == 1) else self.heads

    def items(self):
        """``(name, value)`` of every option, in declaration order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def check_weight(name: str, v) -> float:
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


def check_indices(indices, heads: int, codebook_size: int, check: bool, lead=None) -> None:
    """TypeError/ValueError for indices that :meth:`VectorQuantizer.codes_from_indices` cannot
    decode; ``check`` also checks their range (a host sync); ``lead``: they must have this shape
    (plus ``heads``), the input's without the channel dim."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if heads > 1 and (indices.dim() < 1 or indices.shape[-1] != heads):
        raise ValueError(
            f"indices must have a trailing dim of size heads={heads}, "
            f"got shape {tuple(indices.shape)}"
        )
    # An exported graph cannot raise this error (the range is data): its gather fails instead
    # (torch: IndexError; onnxruntime: Gather's out-of-bounds error).
    if check and indices.numel() > 0 and not torch.compiler.is_exporting():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(
                f"indices must lie in [0, {codebook_size}), got values in [{lo}, {hi}]"
            )
    if lead is not None:
        want = (*lead, heads) if heads > 1 else tuple(lead)
        if tuple(indices.shape) != tuple(want):
            raise ValueError(
                f"indices must have shape {tuple(want)} (x's without the channel dim"
                f"{', plus heads' if heads > 1 else ''}), got {tuple(indices.shape)}"
            )


def check_call_options(layer, freeze_codebook, ema_update, topk, temp) -> tuple:
    """One forward's options checked against ``layer``'s: ``(freeze, ema_step, temperature)``
    (``freeze_codebook`` and the temperature default to the layer's; ``ema_step`` is False only
    for ``ema_update=False``)."""
    freeze = layer.freeze_codebook if freeze_codebook is None else freeze_codebook
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze_codebook must be a bool or None, got {freeze_codebook!r}")
    if ema_update is not None and not isinstance(ema_update, bool):
        raise TypeError(f"ema_update must be a bool or None, got {ema_update!r}")
    if ema_update is False and not layer.ema:
        raise ValueError(
            "ema_update=False applies to an EMA codebook (ema=True); this layer's codebook "
            "learns from the loss: use freeze_codebook=True to stop its updates"
        )
    k = layer.codebook_size
    if topk is not None and (
        isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= k
    ):
        raise ValueError(f"topk must be an int in [1, {k}], got {topk!r}")
    temp = layer.sample_codebook_temp if temp is None else temp
    return freeze, ema_update is not False, check_weight("sample_codebook_temp", temp)
