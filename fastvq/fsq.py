"""``FSQ``: finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505), a sibling of
:class:`~fastvq.VectorQuantizer` without learned codes.

Each of the ``d = len(levels)`` channels is bounded to ``L_i`` values and rounded::

    layout     x (..., dim) or (B, dim, ...) -> rows (N, dim) -> project_in -> (N, C, d)
    bound      b = tanh(z + shift) * half_l - offset       (or the symmetric bound, below)
    round      level = round(b) + L // 2 in [0, L)          integer levels, fp32 arithmetic
    code       (level - L // 2) / (L // 2)                 forward value; gradient: db/dz
    index      sum_i level_i * prod_{j<i} L_j              int64 arithmetic, exact in any dtype

The implicit codebook is the grid of every level combination (``codebook_size = prod(levels)``);
nothing is learned, so there is no :class:`~fastvq.codebook.Codebook`, no EMA and no restart.
The loss is zero (FSQ needs no commitment term). Options: :class:`FSQConfig`; docs/fsq.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from . import _dist
from ._checks import is_int
from .implicit import ImplicitQuantizer
from .layer_config import check_input
from .outputs import quantize_output
from .streams import per_call_generator

__all__ = ["FSQ", "FSQConfig", "fsq_codes", "fsq_indices", "fsq_levels"]


@dataclass
class FSQConfig:
    """Every option of :class:`FSQ`, checked (TypeError/ValueError naming the argument).

    Args:
        levels: values per channel, a sequence of ints >= 2 (>= 3 unless
            ``preserve_symmetry``: the paper's bound has no two-value grid centred on 0).
        dim: channels of the input; default ``len(levels) * num_codebooks``. Otherwise a linear
            projection in and out (``projection_has_bias``).
        num_codebooks: split the projected channels into this many groups of ``len(levels)``,
            each with its own index (``indices`` gains a trailing dim of that size when > 1).
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        projection_has_bias: the projections' bias.
        preserve_symmetry: the symmetric bound of Parker et al. 2024 (arXiv 2411.19842, eq. in
            sec. 3.2): ``code = 2 / (L - 1) * floor((L - 1) (tanh(z) + 1) / 2 + 1/2) - 1``,
            ``L`` values evenly spaced over ``[-1, 1]`` for every ``L`` (even ones included).
        noise_dropout: in training, each element of a real row is, with this probability, the
            bounded value plus uniform noise one grid step wide instead of its rounded value
            (the same paper's noise substitution); its index is still the rounded one. The
            draw comes from a per-call generator (``fastvq.streams``, purpose ``fsq-noise``)
            seeded from torch's RNG, so activation checkpointing replays it.
        bound_margin: ``eps`` of the paper's bound, ``half_l = (L - 1)(1 - eps) / 2``
            (vector-quantize-pytorch uses ``(1 + eps)``: ``bound_margin=-1e-3``). In
            ``(-1, 1)``; the rounded level is clamped to ``[0, L)`` in any case.
        hard_clamp: clamp to ``[-1, 1]`` instead of ``tanh`` in the bound (for inputs already
            in range, as in residual FSQ; vqp's ``bound_hard_clamp``).
    """

    levels: tuple
    dim: int | None = None
    num_codebooks: int = 1
    channel_first: bool = False
    projection_has_bias: bool = True
    preserve_symmetry: bool = False
    noise_dropout: float = 0.0
    bound_margin: float = 1e-3
    hard_clamp: bool = False

    def __post_init__(self):
        lv = self.levels
        if isinstance(lv, torch.Tensor):
            lv = lv.tolist()
        if isinstance(lv, str) or not hasattr(lv, "__len__") or len(lv) == 0:
            raise TypeError(f"levels must be a non-empty sequence of ints, got {self.levels!r}")
        if not all(is_int(v) and v >= 2 for v in lv):
            raise ValueError(f"levels must hold ints >= 2, got {list(lv)!r}")
        if 2 in lv and not self.preserve_symmetry:
            raise ValueError(
                f"levels holds 2 ({list(lv)!r}): the paper's bound has no two-value grid; use "
                "levels >= 3 or preserve_symmetry=True"
            )
        self.levels = tuple(int(v) for v in lv)
        if math.prod(self.levels) >= 2**63:
            raise ValueError(f"levels {list(lv)!r}: prod(levels) must fit an int64 index")
        if not is_int(self.num_codebooks) or self.num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {self.num_codebooks!r}")
        if self.dim is None:
            self.dim = len(self.levels) * self.num_codebooks
        if not is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be None or a positive int, got {self.dim!r}")
        for name in ("channel_first", "projection_has_bias", "preserve_symmetry", "hard_clamp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        p = self.noise_dropout
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"noise_dropout must be a float in [0, 1], got {p!r}")
        self.noise_dropout = float(p)
        m = self.bound_margin
        if isinstance(m, bool) or not isinstance(m, int | float) or not -1.0 < m < 1.0:
            raise ValueError(f"bound_margin must be a float in (-1, 1), got {m!r}")
        self.bound_margin = float(m)

    @classmethod
    def from_options(cls, levels, dim, options: dict) -> FSQConfig:
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                raise TypeError(f"FSQ got an unexpected keyword argument {name!r}")
        return cls(levels, dim, **options)


# --- the math: levels, codes, indices (each a function of tensors) -------------------------------


def fsq_levels(z: torch.Tensor, levels: torch.Tensor, *, symmetric: bool, margin: float = 1e-3,
               hard_clamp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Bound and round fp32 ``z`` (..., d) with ``levels`` int (d,).

    Returns ``(level, s)``: the integer levels as int64 in ``[0, L)`` (NaN rows: 0) and ``s``,
    the continuous bounded value on the codes' scale (the gradient path: ``code(level)`` is
    ``s`` rounded)."""
    lm1 = levels - 1
    if symmetric:  # 2 / (L - 1) * floor((L - 1) (tanh z + 1) / 2 + 1/2) - 1
        t = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
        bracket = lm1 * (t + 1) / 2.0 + 0.5
        step = 2.0 / lm1
        level = bracket.floor()
        s = step * bracket - 1.0
    else:  # tanh(z + atanh(offset / half_l)) * half_l - offset, rounded, over L // 2
        half_l = lm1 * (1 - margin) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            b = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            b = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        half_width = levels // 2
        level = b.round() + half_width
        s = b / half_width
    level = level.nan_to_num(0.0).clamp(torch.zeros_like(lm1), lm1)
    return level.to(torch.int64), s


def fsq_codes(level: torch.Tensor, levels: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """fp32 codes of int ``level`` (..., d) in ``[0, L)``: the grid values in ``[-1, 1]``."""
    lf = level.to(torch.float32)
    if symmetric:
        return lf * (2.0 / (levels - 1)) - 1.0
    half_width = levels // 2
    return (lf - half_width) / half_width


def fsq_indices(level: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """int64 index ``sum_i level_i * basis_i`` of int64 ``level`` (..., d), in int64 arithmetic."""
    return (level * basis).sum(-1)


def fsq_index_levels(indices: torch.Tensor, levels: torch.Tensor, basis: torch.Tensor):
    """The int64 levels (..., d) of int ``indices`` (...): ``(index // basis_i) % L_i``."""
    return (indices.to(torch.int64).unsqueeze(-1) // basis) % levels


class FSQ(ImplicitQuantizer):
    """Finite scalar quantization with the layer conventions of :class:`~fastvq.VectorQuantizer`.

    ``FSQ(levels, dim=None, **options)`` (:class:`FSQConfig`). ``q(x)`` returns
    ``(quantized, indices, loss)``: ``quantized`` like ``x`` (forward value the codes, gradient
    the bound's), ``indices`` int64 (``x``'s shape without the channel dim, plus
    ``num_codebooks`` when > 1), ``loss`` a zero fp32 scalar. The rounding runs in fp32 with
    autocast off, whatever ``x``'s dtype; the index is integer arithmetic on the levels.

    Args:
        levels: values per channel, a sequence (or 1-D tensor) of ints >= 2 (2 only with
            ``preserve_symmetry``); ``codebook_size = prod(levels)``, as :class:`FSQConfig`.
        dim: channels of the input (default ``len(levels) * num_codebooks``; otherwise a linear
            projection in and out).
        **options: every other :class:`FSQConfig` option, by keyword (TypeError for an unknown
            name).
    """

    def __init__(self, levels, dim: int | None = None, **options):
        super().__init__()
        cfg = FSQConfig.from_options(levels, dim, options)
        for f in fields(cfg):
            setattr(self, f.name, getattr(cfg, f.name))
        d = len(self.levels)
        self.codebook_dim = d
        self.codebook_size = math.prod(self.levels)
        basis = [math.prod(self.levels[:i]) for i in range(d)]
        self.register_buffer("levels_t", torch.tensor(self.levels, dtype=torch.int64), False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), False)
        inner = d * self.num_codebooks
        bias = self.projection_has_bias
        proj = inner != self.dim
        self.project_in = nn.Linear(self.dim, inner, bias=bias) if proj else nn.Identity()
        self.project_out = nn.Linear(inner, self.dim, bias=bias) if proj else nn.Identity()

    def extra_repr(self) -> str:
        names = ("levels", "dim", "num_codebooks", "preserve_symmetry", "noise_dropout")
        return ", ".join(f"{n}={getattr(self, n)}" for n in names + ("channel_first",))

    def quantize_rows(self, z: torch.Tensor, keep: torch.Tensor | None, training: bool):
        """Quantize rows ``z`` (N, C, d) (any float dtype; fp32 inside): ``(q, idx)`` with
        ``q`` fp32 (N, C, d) (codes forward; masked rows: no gradient) and ``idx`` int64 (N, C).

        Args:
            z: (N, C, d) rows, ``project_in``'s output split into ``C = num_codebooks`` groups.
            keep: None, or bool (N,), True for the real rows (masked rows get their code, no
                gradient and no noise).
            training: apply ``noise_dropout`` (its only effect: the gradient goes through the
                bound in either mode).
        """
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(torch.float32)
            if keep is not None:  # masked rows: their code, no gradient, no NaN in autograd
                k3 = keep[:, None, None]
                z = torch.where(k3, z, z.detach().nan_to_num(0.0))
            lv = self.levels_t
            level, s = fsq_levels(
                z, lv, symmetric=self.preserve_symmetry, margin=self.bound_margin,
                hard_clamp=self.hard_clamp,
            )  # fmt: skip
            codes = fsq_codes(level, lv, symmetric=self.preserve_symmetry)
            q = codes + (s - s.detach())  # the codes exactly; the bound's gradient
            if keep is not None:
                q = torch.where(k3, q, codes)
            if training and self.noise_dropout > 0 and z.numel() > 0:
                q = self._noise(q, s, keep)
            return q, fsq_indices(level, self.basis)

    def _noise(self, q, s, keep):
        gen = per_call_generator("fsq-noise", "cpu", _dist.rank())
        pick = torch.rand(q.shape, generator=gen) < self.noise_dropout
        step = (2.0 / (self.levels_t - 1)) if self.preserve_symmetry else 1.0 / (self.levels_t // 2)
        u = (torch.rand(q.shape, generator=gen) - 0.5).to(q.device) * step
        pick = pick.to(q.device)
        if keep is not None:
            pick = pick & keep[:, None, None]
        return torch.where(pick, s + u, q)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_stats: bool = False):  # fmt: skip
        """Quantize ``x`` (``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``);
        ``mask`` bool, ``x``'s shape without the channel dim (True = real row: masked rows
        output their code, pass no gradient and count in no statistic). ``return_stats`` adds
        :class:`~fastvq.CodebookStats` (counts ``(num_codebooks, codebook_size)``).

        Args:
            x: float32, float16 or bfloat16 ``(..., dim)``, or ``(B, dim, ...)`` with
                ``channel_first``.
            mask: None, or bool with ``x``'s shape without the channel dim; True = real row.
            return_stats: also return :class:`~fastvq.CodebookStats` of the real rows.
        """
        check_input(x, self.dim, self.channel_first)
        lead, keep, z = self.rows_in(x, mask)  # z (N, C * d)
        n = z.shape[0]
        q, idx = self.quantize_rows(
            z.reshape(n, self.num_codebooks, self.codebook_dim), keep, self.training
        )
        quantized = self.rows_out(q, z, x, lead)
        indices = self.layer_indices(idx, lead)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        stats = self.batch_stats(idx, keep) if return_stats else None
        return quantize_output(quantized, indices, loss, stats)

    def index_levels(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 levels ``(..., d)`` in ``[0, L)`` of int ``indices`` (vqp's
        ``indices_to_level_indices``).

        Args:
            indices: int tensor of any shape, values in ``[0, codebook_size)`` (not checked);
                the levels are ``indices.shape + (d,)``.
        """
        return fsq_index_levels(indices, self.levels_t, self.basis)

    def grid_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """fp32 grid codes ``(..., d)`` of ``indices``, before ``project_out``.

        Args:
            indices: int tensor of any shape, values in ``[0, codebook_size)`` (not checked);
                the codes are ``indices.shape + (d,)``, values in ``[-1, 1]``.
        """
        lv = self.levels_t
        return fsq_codes(self.index_levels(indices), lv, symmetric=self.preserve_symmetry)

    def get_codebook(self) -> torch.Tensor:
        """The implicit codebook, fp32 ``(codebook_size, len(levels))`` (``codebook_size`` rows:
        mind large grids)."""
        return self.grid_codes(torch.arange(self.codebook_size, device=self.basis.device))
