"""``ResidualFSQ`` and ``GroupedResidualFSQ``: stacks of :class:`~fastvq.FSQ` layers.

    r_0 = clamp(project_in(x));  (c_i, idx_i) = FSQ_i(r_i / s_i);  q_i = s_i c_i
    r_{i+1} = r_i - sg(q_i);     quantized = project_out(sum_i q_i)

with FSQ's per-depth hooks: the residual scale ``s_i = levels^-i`` (each depth resolves the
grid step the previous one left) and the input clamp ``clamp(r) = tanh(r / c) c``,
``c = 1 + 1 / (levels - 1)`` (vector-quantize-pytorch's ``soft_clamp_input_value``). Quantize
dropout, its replay under activation checkpointing and the output tuples are
:mod:`fastvq.residual`'s (``ResidualVQ``'s rules, imported, not copied): a depth left out gives
index ``-1`` and no code. FSQ has no state, so a stack issues no collective and needs no
cross-rank check; the dropout draw comes from the module's seeded stream, the same on every rank.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .fsq import FSQ
from .layer_config import check_indices, check_input, check_mask
from .residual import check_active, check_dropout, merge_groups, replayable_draw, stack_output
from .streams import RandomStreams

__all__ = ["GroupedResidualFSQ", "ResidualFSQ"]


class ResidualFSQ(nn.Module):
    """Residual FSQ: ``num_quantizers`` :class:`~fastvq.FSQ` layers of the same ``levels``.

    Args:
        levels: values per channel (as :class:`~fastvq.FSQ`); ``codebook_size = prod(levels)``
            per depth.
        num_quantizers: depths Q.
        dim: channels of the input (default ``len(levels)``; otherwise one projection in and
            out shared by all depths, ``projection_has_bias``).
        channel_first: ``x`` is ``(B, dim, ...)``.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: as
            :class:`~fastvq.ResidualVQ` (the same draw and replay; ``seed`` seeds it).
        preserve_symmetry, hard_clamp: each depth's FSQ options (default True, as vqp's
            ``ResidualFSQ``: the symmetric grid, clamped after the input's soft clamp).
        soft_clamp_input_value: ``c`` of the input clamp ``tanh(r / c) c`` (a float or one per
            channel); default ``1 + 1 / (levels - 1)`` with ``hard_clamp``, none without.
        **fsq_kwargs: every other FSQ option (``bound_margin``, ``noise_dropout``).

    ``forward`` returns ``(quantized, indices, loss)``, indices int64 ``x``'s shape without the
    channel dim plus ``(Q,)``, ``-1`` for a dropped depth; ``loss`` zero (``return_losses``:
    ``(Q,)`` zeros; ``return_stats``: per depth :class:`~fastvq.CodebookStats` or None).
    """

    def __init__(
        self, levels, num_quantizers: int, dim: int | None = None, *,
        channel_first: bool = False, quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
        preserve_symmetry: bool = True, hard_clamp: bool = True,
        soft_clamp_input_value=None, projection_has_bias: bool = True, seed: int = 0,
        **fsq_kwargs,
    ):  # fmt: skip
        super().__init__()
        q = num_quantizers
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {q!r}")
        for bad in ("dim", "num_codebooks"):
            if bad in fsq_kwargs:
                raise TypeError(f"ResidualFSQ got an unexpected keyword argument {bad!r}")
        self.layers = nn.ModuleList(
            FSQ(levels, preserve_symmetry=preserve_symmetry, hard_clamp=hard_clamp, **fsq_kwargs)
            for _ in range(q)
        )
        first = self.layers[0]
        d = first.codebook_dim
        self.levels, self.codebook_dim, self.codebook_size = first.levels, d, first.codebook_size
        self.dim = d if dim is None else dim
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be None or a positive int, got {dim!r}")
        check_dropout(q, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.num_quantizers, self.channel_first = q, bool(channel_first)
        self.quantize_dropout = bool(quantize_dropout) and q > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        bias = projection_has_bias
        proj = self.dim != d
        self.project_in = nn.Linear(self.dim, d, bias=bias) if proj else nn.Identity()
        self.project_out = nn.Linear(d, self.dim, bias=bias) if proj else nn.Identity()
        lv = torch.tensor(self.levels, dtype=torch.float32)
        # per-depth hook: the residual's scale levels^-depth (fp32, as vqp's buffer)
        self.register_buffer("scales", torch.stack([lv**-i for i in range(q)]), False)
        clamp = soft_clamp_input_value
        if clamp is None and hard_clamp:
            clamp = 1 + 1 / (lv - 1)
        elif clamp is not None:
            clamp = torch.as_tensor(clamp, dtype=torch.float32)
            if not bool((clamp > 0).all()):
                raise ValueError(
                    f"soft_clamp_input_value must be > 0, got {soft_clamp_input_value!r}"
                )
        self.register_buffer("soft_clamp_input_value", clamp, False)
        self.seed = seed
        self.random_streams = RandomStreams(seed)  # quantize dropout, as ResidualVQ
        self.last_num_active = None
        self.dropout_draws = OrderedDict()  # per-call draws, replayed by recomputations

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}, "
            f"quantize_dropout={self.quantize_dropout}"
        )

    def num_active_for(self, num_active: int | None) -> int:
        """This call's depths: ``num_active``, or in training with quantize dropout a draw
        (replayed by activation checkpointing's recomputation), else Q."""
        check_active(num_active, self.num_quantizers)
        if num_active is None and self.training and self.quantize_dropout:
            num_active = replayable_draw(
                self, self.num_quantizers, self.quantize_dropout_cutoff_index,
                self.quantize_dropout_multiple_of,
            )  # fmt: skip
        return self.num_quantizers if num_active is None else num_active

    def quantize(self, x: torch.Tensor, mask, num_active: int | None = None):
        """The stack on rows ``x`` (N, dim): ``(total, idx)`` with ``total`` fp32
        (N, codebook_dim) the sum of the depths' scaled codes (before ``project_out``) and
        ``idx`` a list, per active depth, of int64 (N,). ``mask``: optional bool (N,)."""
        n = x.shape[0]
        if mask is not None:  # masked rows: detached and finite, so no NaN reaches a gradient
            x = torch.where(mask[:, None], x, x.detach().nan_to_num(0.0))
        w = getattr(self.project_in, "weight", None)
        if w is not None and x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        z = self.project_in(x)
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(torch.float32)
            c = self.soft_clamp_input_value
            if c is not None:
                z = (z / c).tanh() * c
            residual, total, idx = z, None, []
            for depth in range(num_active):
                scale = self.scales[depth]
                q, i = self.layers[depth].quantize_rows(
                    (residual / scale).reshape(n, 1, self.codebook_dim), mask, self.training
                )
                q = q.reshape(n, self.codebook_dim) * scale
                residual = residual - q.detach()
                total = q if total is None else total + q
                idx.append(i.reshape(n))
        return total, idx

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        return_losses: bool = False, num_active: int | None = None,
    ):  # fmt: skip
        """Quantize ``x`` with every depth, or the first ``num_active``; ``mask`` as
        :class:`~fastvq.FSQ` (masked rows: codes, no gradient, no counts)."""
        check_input(x, self.dim, self.channel_first)
        if self.channel_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        if mask is not None:
            check_mask(mask, lead)
        num_active = self.num_active_for(num_active)
        n = math.prod(lead)
        keep = None if mask is None else mask.reshape(n)
        total, idx = self.quantize(x.reshape(n, self.dim), keep, num_active)
        out = self.project_out(total)
        if out.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            out = out.to(x.dtype)
        quantized = out.reshape(*lead, self.dim)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        dropped = self.num_quantizers - num_active
        stats = [self.layers[0].batch_stats(i[:, None], keep) for i in idx] if return_stats else []
        idx = idx + [torch.full_like(idx[0], -1)] * dropped
        indices = torch.stack(idx, dim=-1).reshape(*lead, self.num_quantizers)
        losses = torch.zeros(self.num_quantizers, dtype=torch.float32, device=x.device)
        loss = losses.sum()
        stats = stats + [None] * dropped
        return stack_output(quantized, indices, loss, losses, stats, return_losses, return_stats)

    def check_indices(self, indices: torch.Tensor, check: bool = True) -> None:
        check_indices(indices, 1, 0, check=False)  # a tensor of an integer dtype
        q = self.num_quantizers
        if indices.dim() < 1 or indices.shape[-1] != q:
            raise ValueError(
                f"indices must have a trailing dim of size num_quantizers={q}, "
                f"got shape {tuple(indices.shape)}"
            )
        if check and indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < -1 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}) (or be -1, no code), got "
                    f"values in [{lo}, {hi}]"
                )

    def depth_codes(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """fp32 ``(..., Q, codebook_dim)``: each depth's scaled code (0 for index -1), before
        ``project_out`` (vqp's ``get_codes_from_indices``, in fastvq's trailing layout)."""
        self.check_indices(indices, check)
        out = []
        for depth in range(self.num_quantizers):
            i = indices[..., depth].to(torch.int64)
            c = self.layers[depth].grid_codes(i.clamp_min(0)) * self.scales[depth]
            out.append(torch.where((i >= 0).unsqueeze(-1), c, 0.0))
        return torch.stack(out, dim=-2)

    def codes_from_indices(self, indices: torch.Tensor, *, dtype: torch.dtype | None = None,
                           check: bool = True) -> torch.Tensor:  # fmt: skip
        """Decode ``(..., Q)`` indices (``-1``: no code) to the module's output (eval, no noise:
        bit-identical to forward); ``dtype``: the input's dtype the output should match."""
        codes = self.depth_codes(indices, check=check)
        total = codes[..., 0, :]
        for depth in range(1, self.num_quantizers):  # in depth order, as the forward sums
            total = total + codes[..., depth, :]
        out = self.project_out(total)
        out = out if dtype is None else out.to(dtype)
        return out.movedim(-1, 1) if self.channel_first else out


class GroupedResidualFSQ(nn.Module):
    """``groups`` :class:`ResidualFSQ` stacks over equal slices of the channel dim (as
    :class:`~fastvq.GroupedResidualVQ`): indices ``(..., groups, Q)``, ``loss`` zero, one
    quantize-dropout draw per forward for every group. Other arguments: :class:`ResidualFSQ`.

    Args:
        levels: FSQ levels of every stage of every group (as :class:`ResidualFSQ`).
        num_quantizers: Q, stages per group.
        dim: channels of the input, divisible by ``groups``.
        groups: stacks, each on ``dim // groups`` consecutive channels.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        seed: group ``g``'s stack gets ``seed + g`` (its quantize-dropout and noise streams).
    """

    def __init__(self, levels, num_quantizers: int, dim: int, *, groups: int = 1,
                 channel_first: bool = False, seed: int = 0, **kwargs):  # fmt: skip
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim % groups:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by groups ({groups})")
        self.dim, self.groups, self.channel_first = dim, groups, bool(channel_first)
        self.rvqs = nn.ModuleList(
            ResidualFSQ(levels, num_quantizers, dim // groups, seed=seed + g, **kwargs)
            for g in range(groups)
        )
        first = self.rvqs[0]
        self.num_quantizers, self.codebook_size = first.num_quantizers, first.codebook_size

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        return_losses: bool = False, num_active: int | None = None,
    ):  # fmt: skip
        check_input(x, self.dim, self.channel_first)
        if self.channel_first:
            x = x.movedim(1, -1)
        num_active = self.rvqs[0].num_active_for(num_active)  # one draw for every group
        outs = [
            rvq(chunk, mask, return_stats=True, return_losses=True, num_active=num_active)
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=-1), strict=True)
        ]
        return merge_groups(outs, self.channel_first, return_losses, return_stats)

    def codes_from_indices(self, indices: torch.Tensor, *, dtype: torch.dtype | None = None,
                           check: bool = True) -> torch.Tensor:  # fmt: skip
        """Decode ``(..., groups, Q)`` indices (``-1``: no code) to the module's output."""
        check_indices(indices, 1, 0, check=False)
        if indices.dim() < 2 or indices.shape[-2:] != (self.groups, self.num_quantizers):
            raise ValueError(
                f"indices must end with (groups, num_quantizers) = "
                f"({self.groups}, {self.num_quantizers}), got shape {tuple(indices.shape)}"
            )
        out = torch.cat(
            [
                rvq.codes_from_indices(indices[..., g, :], dtype=dtype, check=check)
                for g, rvq in enumerate(self.rvqs)
            ],
            dim=-1,
        )
        return out.movedim(-1, 1) if self.channel_first else out
