"""``LFQ``: lookup-free quantization (Yu et al. 2023, arXiv 2310.05737) and, with ``spherical``,
binary spherical quantization (BSQ, Zhao et al. 2024, arXiv 2406.07548): a sibling of
:class:`~fastvq.FSQ` without learned codes, and with an entropy loss::

    layout     x (..., dim) or (B, dim, ...) -> rows (N, dim) -> project_in -> (N, C, d)
    bound      optional soft clamp tanh(z / v) v; spherical: z <- s z / ||z||
    code       c_i = +s if z_i > 0 else -s   (spherical: c <- s c / ||c||)     fp32
    index      sum_i [z_i > 0] 2^(d - 1 - i)                                   int64 arithmetic
    loss       w_e (H_sample - gamma H_codebook) + w_c mse(z, sg(c))           training only

``d = log2(codebook_size)`` bits per codebook. The entropies are over the softmax of
``-beta ||z - c||^2`` over all ``2^d`` codes, computed exactly and in chunks of codes by
:mod:`fastvq.lfq_entropy` (never an ``N x 2^d`` matrix). Options: :class:`LFQConfig`;
docs/lfq.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist
from ._checks import is_int, is_real
from .implicit import ImplicitQuantizer
from .layer_config import check_input
from .lfq_entropy import clamped_sample_entropy, codebook_entropy, per_sample_entropy
from .outputs import quantize_output
from .streams import per_call_generator

__all__ = ["LFQ", "LFQConfig", "LFQLossBreakdown", "lfq_codes"]


class LFQLossBreakdown(NamedTuple):
    """The unweighted terms of LFQ's loss (means over codebooks), fp32 0-dim tensors:
    ``loss = entropy_loss_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)
    + commitment_loss_weight * commitment``."""

    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    commitment: torch.Tensor


@dataclass
class LFQConfig:
    """Every option of :class:`LFQ`, checked (TypeError/ValueError naming the argument).

    Args:
        dim: channels of the input; default ``log2(codebook_size) * num_codebooks``. Otherwise
            (or with ``projections=True``) a linear projection in and out.
        codebook_size: codes per codebook, a power of 2 (default ``2 ** dim``).
        entropy_loss_weight: ``w_e``, the entropy term's weight (0: the entropies are not
            computed, unless ``forward`` asks for a loss breakdown).
        commitment_loss_weight: ``w_c``, the weight of ``mse(z, sg(codes))`` over the real rows
            (0, the default: not computed, and 0 in the breakdown).
        diversity_gamma: the codebook entropy's weight inside the entropy term.
        num_codebooks: split the projected channels into this many groups of ``d`` bits, each
            with its own index (``indices`` gains a trailing dim of that size when > 1).
        spherical: BSQ: the input and the codes on the sphere of radius ``codebook_scale``.
        codebook_scale: ``s``, the codes' magnitude per channel (spherical: their norm).
        frac_per_sample_entropy: in ``(0, 1]``: the entropies over a random fraction of the real
            rows (drawn per call from the ``lfq-entropy-rows`` stream), as vqp.
        soft_clamp_input_value: ``v >= codebook_scale``: ``z <- tanh(z / v) v`` before the rest.
        inv_temperature: ``beta`` of the logits ``-beta ||z - c||^2`` (``forward`` can override).
        prob_floor: None (exact entropies) or ``eps`` in ``(0, 1)``: take ``log(max(p, eps))``
            as vector-quantize-pytorch does (``1e-5``); computed in chunks of codes.
        entropy_chunk: codes per chunk in the entropies (default: ``C * N * chunk`` about 1M).
        projections: force the projections on or off (default: when ``dim != C * d``).
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        projection_has_bias: ``project_in`` and ``project_out`` have a bias (when there are
            projections).
    """

    dim: int | None = None
    codebook_size: int | None = None
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.0
    diversity_gamma: float = 1.0
    num_codebooks: int = 1
    spherical: bool = False
    codebook_scale: float = 1.0
    frac_per_sample_entropy: float = 1.0
    soft_clamp_input_value: float | None = None
    inv_temperature: float = 100.0
    prob_floor: float | None = None
    entropy_chunk: int | None = None
    projections: bool | None = None
    channel_first: bool = False
    projection_has_bias: bool = True

    def __post_init__(self):
        if self.dim is None and self.codebook_size is None:
            raise ValueError("dim or codebook_size must be given")
        if not is_int(self.num_codebooks) or self.num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {self.num_codebooks!r}")
        if self.codebook_size is None:
            if not is_int(self.dim) or not 1 <= self.dim <= 62:
                raise ValueError(f"dim must be an int in [1, 62] without codebook_size, got "
                                 f"{self.dim!r}")  # fmt: skip
            self.codebook_size = 2**self.dim
        k = self.codebook_size
        if not is_int(k) or k < 2 or k & (k - 1) or k > 2**62:
            raise ValueError(f"codebook_size must be a power of 2 in [2, 2**62], got {k!r}")
        self.codebook_dim = k.bit_length() - 1
        if self.dim is None:
            self.dim = self.codebook_dim * self.num_codebooks
        if not is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be None or a positive int, got {self.dim!r}")
        for name in ("entropy_loss_weight", "commitment_loss_weight", "diversity_gamma"):
            if not is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a finite float, got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))
        for name in ("codebook_scale", "inv_temperature"):
            v = getattr(self, name)
            if not is_real(v) or v <= 0:
                raise ValueError(f"{name} must be a positive float, got {v!r}")
            setattr(self, name, float(v))
        f = self.frac_per_sample_entropy
        if not is_real(f) or not 0 < f <= 1:
            raise ValueError(f"frac_per_sample_entropy must be a float in (0, 1], got {f!r}")
        v = self.soft_clamp_input_value
        if v is not None and (not is_real(v) or v < self.codebook_scale):
            raise ValueError(
                f"soft_clamp_input_value must be None or a float >= codebook_scale, got {v!r}"
            )
        p = self.prob_floor
        if p is not None and (not is_real(p) or not 0 < p < 1):
            raise ValueError(f"prob_floor must be None or a float in (0, 1), got {p!r}")
        c = self.entropy_chunk
        if c is not None and (not is_int(c) or c < 1):
            raise ValueError(f"entropy_chunk must be None or a positive int, got {c!r}")
        for name in ("spherical", "channel_first", "projection_has_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.projections is not None and not isinstance(self.projections, bool):
            raise TypeError(f"projections must be None or a bool, got {self.projections!r}")

    @classmethod
    def from_options(cls, dim, codebook_size, options: dict) -> LFQConfig:
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                raise TypeError(f"LFQ got an unexpected keyword argument {name!r}")
        return cls(dim, codebook_size, **options)


def lfq_codes(bits: torch.Tensor, scale: float, spherical: bool) -> torch.Tensor:
    """fp32 codes of bool ``bits`` (..., d): ``+-scale``, spherical: normalised to norm
    ``scale``. The one formula of the forward and of :meth:`LFQ.codes_from_indices`."""
    codes = torch.where(bits, scale, -scale).to(torch.float32)
    return F.normalize(codes, dim=-1) * scale if spherical else codes


class LFQ(ImplicitQuantizer):
    """Lookup-free (or, ``spherical``, binary spherical) quantization with the layer conventions
    of :class:`~fastvq.VectorQuantizer`.

    ``LFQ(dim=None, codebook_size=None, **options)`` (:class:`LFQConfig`). ``q(x)`` returns
    ``(quantized, indices, loss)``: ``quantized`` like ``x`` (forward value the codes, gradient
    straight through), ``indices`` int64 (``x``'s shape without the channel dim, plus
    ``num_codebooks`` when > 1), ``loss`` fp32 (in training; zero in eval). The sign and the
    entropies run in fp32 with autocast off, whatever ``x``'s dtype.

    Args:
        dim: channels of the input (default ``log2(codebook_size) * num_codebooks``), as
            :class:`LFQConfig`.
        codebook_size: codes per codebook, a power of 2 in ``[2, 2**62]`` (default ``2 ** dim``);
            ``dim`` or ``codebook_size`` must be given.
        **options: every other :class:`LFQConfig` option, by keyword (TypeError for an unknown
            name).
    """

    def __init__(self, dim: int | None = None, codebook_size: int | None = None, **options):
        super().__init__()
        cfg = LFQConfig.from_options(dim, codebook_size, options)
        for f in fields(cfg):
            setattr(self, f.name, getattr(cfg, f.name))
        d = self.codebook_dim = cfg.codebook_dim
        shifts = torch.arange(d - 1, -1, -1, dtype=torch.int64)
        self.register_buffer("bit_shifts", shifts, False)
        inner = d * self.num_codebooks
        proj = inner != self.dim if self.projections is None else self.projections
        if proj:
            self.project_in = nn.Linear(self.dim, inner, bias=self.projection_has_bias)
            self.project_out = nn.Linear(inner, self.dim, bias=self.projection_has_bias)
        else:
            if inner != self.dim:
                raise ValueError(f"projections=False needs dim == {inner}, got dim={self.dim}")
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

    def extra_repr(self) -> str:
        names = ("dim", "codebook_size", "num_codebooks", "spherical", "channel_first")
        return ", ".join(f"{n}={getattr(self, n)}" for n in names)

    @property
    def bit_scale(self) -> float:
        """``s``: each code's magnitude per channel (spherical: ``codebook_scale / sqrt(d)``)."""
        s = self.codebook_scale
        return s / math.sqrt(self.codebook_dim) if self.spherical else s

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """fp32 ``z`` (N, C * d) -> (N, C, d): the soft clamp, the split, the sphere.

        Args:
            z: fp32 (N, C * d), ``project_in``'s output rows (``C = num_codebooks``).
        """
        v = self.soft_clamp_input_value
        if v is not None:
            z = torch.tanh(z / v) * v
        z = z.reshape(z.shape[0], self.num_codebooks, self.codebook_dim)
        return F.normalize(z, dim=-1) * self.codebook_scale if self.spherical else z

    def quantize_rows(self, z: torch.Tensor, keep: torch.Tensor | None, training: bool):
        """Quantize bounded fp32 rows ``z`` (N, C, d): ``(q, codes, idx)``, ``q`` fp32 (N, C, d)
        (codes forward; straight through in training; masked rows: no gradient), ``codes`` the
        codes and ``idx`` int64 (N, C).

        Args:
            z: fp32 (N, C, d) rows from :meth:`bound`.
            keep: None, or bool (N,), True for the real rows (masked rows get the bare codes).
            training: the straight-through gradient ``codes + z - sg(z)``; False: the codes
                alone, no gradient to ``z``.
        """
        bits = z > 0
        codes = lfq_codes(bits, self.codebook_scale, self.spherical)
        idx = (bits.to(torch.int64) << self.bit_shifts).sum(-1)
        q = codes + (z - z.detach()) if training else codes
        if keep is not None:
            q = torch.where(keep[:, None, None], q, codes)
        return q, codes, idx

    def entropy_rows(self, z: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The rows (M, C, d) the entropies see: the real ones, then a random fraction.

        Args:
            z: fp32 (N, C, d) rows from :meth:`bound`.
            keep: None, or bool (N,), True for the real rows (the others are dropped first).
        """
        if keep is not None:
            z = z[keep]
        f = self.frac_per_sample_entropy
        if f < 1 and z.shape[0] > 0:
            gen = per_call_generator("lfq-entropy-rows", "cpu", _dist.rank())
            pick = torch.randperm(z.shape[0], generator=gen)[: int(z.shape[0] * f)]
            z = z[pick.to(z.device)]
        return z

    def entropies(self, z: torch.Tensor, inv_temperature: float):
        """``(per_sample, codebook)`` entropies of rows ``z`` (M, C, d), means over codebooks.

        Args:
            z: fp32 (M, C, d) rows, from :meth:`entropy_rows`.
            inv_temperature: ``beta > 0`` of the logits ``-beta ||z - c||^2`` (not checked here).
        """
        u = (4.0 * inv_temperature * self.bit_scale) * z.transpose(0, 1)  # (C, M, d) bit logits
        floor = None if self.prob_floor is None else math.log(self.prob_floor)
        chunk = self.entropy_chunk
        hs = per_sample_entropy(u) if floor is None else clamped_sample_entropy(u, floor, chunk)
        hc = codebook_entropy(u, chunk, floor)
        return hs.mean().float(), hc.mean().float()

    def loss_terms(self, z, codes, keep, inv_temperature: float, breakdown: bool):
        """The loss (fp32 scalar) and its :class:`LFQLossBreakdown` of training rows.

        Args:
            z: fp32 (N, C, d) rows from :meth:`bound`.
            codes: fp32 (N, C, d), the rows' codes from :meth:`quantize_rows` (the commitment
                target, detached).
            keep: None, or bool (N,), True for the rows that count (the others count in no term).
            inv_temperature: ``beta > 0`` of the entropies' logits.
            breakdown: compute the entropies even when ``entropy_loss_weight`` is 0, so the
                breakdown holds them.
        """
        zero = torch.zeros((), dtype=torch.float32, device=z.device)
        hs = hc = commit = zero
        if self.entropy_loss_weight != 0 or breakdown:
            hs, hc = self.entropies(self.entropy_rows(z, keep), inv_temperature)
        if self.commitment_loss_weight != 0:  # off: 0 in the breakdown too
            zr, cr = (z, codes) if keep is None else (z[keep], codes[keep])
            commit = F.mse_loss(zr, cr.detach()) if zr.numel() > 0 else zero
        loss = self.entropy_loss_weight * (hs - self.diversity_gamma * hc)
        loss = loss + self.commitment_loss_weight * commit
        return loss, LFQLossBreakdown(hs, hc, commit)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                inv_temperature: float | None = None, return_stats: bool = False,
                return_loss_breakdown: bool = False):  # fmt: skip
        """Quantize ``x`` (``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``);
        ``mask`` bool, ``x``'s shape without the channel dim (True = real row: masked rows
        output their code, pass no gradient and count in no loss or statistic).
        ``inv_temperature`` overrides the configured one; ``return_stats`` adds
        :class:`~fastvq.CodebookStats`, ``return_loss_breakdown`` a detached
        :class:`LFQLossBreakdown` (zeros in eval).

        Args:
            x: float32, float16 or bfloat16 ``(..., dim)``, or ``(B, dim, ...)`` with
                ``channel_first``.
            mask: None, or bool with ``x``'s shape without the channel dim; True = real row.
            inv_temperature: positive float, ``beta`` of the entropies' logits for this call;
                None: the configured one. Only the training loss uses it.
            return_stats: also return :class:`~fastvq.CodebookStats` (counts
                ``(num_codebooks, codebook_size)``) of the real rows.
            return_loss_breakdown: also return the detached :class:`LFQLossBreakdown`; in
                training the entropies are then computed even with ``entropy_loss_weight=0``.
        """
        check_input(x, self.dim, self.channel_first)
        beta = self.inv_temperature if inv_temperature is None else inv_temperature
        if not is_real(beta) or beta <= 0:
            raise ValueError(f"inv_temperature must be a positive float, got {beta!r}")
        lead, keep, zp = self.rows_in(x, mask)  # zp (N, C * d)
        with torch.autocast(x.device.type, enabled=False):
            z = self.bound(zp.to(torch.float32))
            q, codes, idx = self.quantize_rows(z, keep, self.training)
            zero = torch.zeros((), dtype=torch.float32, device=x.device)
            loss, parts = zero, LFQLossBreakdown(zero, zero, zero)
            if self.training:
                loss, parts = self.loss_terms(z, codes, keep, beta, return_loss_breakdown)
        quantized = self.rows_out(q, zp, x, lead)
        indices = self.layer_indices(idx, lead)
        stats = self.batch_stats(idx, keep) if return_stats else None
        bd = LFQLossBreakdown(*(t.detach() for t in parts)) if return_loss_breakdown else None
        return quantize_output(quantized, indices, loss, stats, bd)

    def grid_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """fp32 codes ``(..., d)`` of int ``indices``, before ``project_out``.

        Args:
            indices: int tensor of any shape, values in ``[0, codebook_size)`` (not checked:
                only the low ``d`` bits are read); the codes are ``indices.shape + (d,)``.
        """
        bits = ((indices.to(torch.int64).unsqueeze(-1) >> self.bit_shifts) & 1).bool()
        return lfq_codes(bits, self.codebook_scale, self.spherical)

    def get_codebook(self) -> torch.Tensor:
        """The implicit codebook, fp32 ``(codebook_size, d)`` (mind large codebooks)."""
        return self.grid_codes(torch.arange(self.codebook_size, device=self.bit_shifts.device))
