"""The residual stack of every quantizer family: one depth loop over layers that return
``(quantized, indices, loss)``, and the module around it for the families without a
``Codebook`` (FSQ, LFQ)::

    r_0 = clamp(project_in(x));  (q_i, idx_i, l_i) = layer_i(r_i / s_i);  q_i <- s_i q_i
    r_{i+1} = r_i - sg(q_i);     quantized = project_out(sum_i q_i);  loss = sum_i l_i

Per-depth hooks: the residual's scale ``s_i`` (divides what a depth sees, multiplies what it
gives back: FSQ's ``levels^-i``), the input clamp (FSQ's ``tanh(r / c) c``), and the depth
layers themselves, built per depth by the family (LFQ's ``codebook_scale * 2^-i``). Quantize
dropout (SoundStream): in training the first ``n`` depths run, ``n`` drawn from the module's
seeded stream and replayed by activation checkpointing's recomputation; a depth left out gives
index ``-1``, no code and a zero loss. :class:`~fastvq.ResidualVQ` runs its plain route through
:func:`run_depths` and draws and returns through the functions here; its pooled routes (shared
codebook, beam search) are VQ's own.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import is_int
from .codebook import in_backward
from .layer_config import check_indices, check_input, check_mask
from .outputs import QuantizeOutput, QuantizeOutputWithStats
from .streams import RandomStreams

__all__ = [
    "GroupedResidualStack", "ResidualOutputWithBreakdown", "ResidualOutputWithLosses",
    "ResidualOutputWithLossesAndStats", "ResidualStack", "run_depths",
]  # fmt: skip


# --- what stacks return ---------------------------------------------------------------------------


class ResidualOutputWithLosses(NamedTuple):
    """``forward(..., return_losses=True)``: ``(quantized, indices, loss, losses)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    losses: torch.Tensor  # fp32 (num_quantizers,) (grouped: (groups, num_quantizers))


class ResidualOutputWithLossesAndStats(NamedTuple):
    """``forward(..., return_losses=True, return_stats=True)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    losses: torch.Tensor
    stats: list


class ResidualOutputWithBreakdown(NamedTuple):
    """``forward(..., return_loss_breakdown=True)``: every field; ``stats`` None unless
    ``return_stats``, ``breakdown`` the depth layers' breakdown type with each term fp32
    ``(Q,)`` per depth (detached; 0 for a depth left out)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    losses: torch.Tensor
    stats: list | None
    breakdown: NamedTuple


def stack_output(quantized, indices, loss, losses, stats, return_losses, return_stats,
                 breakdown=None):  # fmt: skip
    """A stack's return value: ``(quantized, indices, loss)``, then ``losses`` (fp32 ``(Q,)``)
    and ``stats`` (a list of Q) when asked for, in that order; with a ``breakdown``, every field
    (:class:`ResidualOutputWithBreakdown`)."""
    if breakdown is not None:
        stats = stats if return_stats else None
        return ResidualOutputWithBreakdown(quantized, indices, loss, losses, stats, breakdown)
    if return_losses and return_stats:
        return ResidualOutputWithLossesAndStats(quantized, indices, loss, losses, stats)
    if return_losses:
        return ResidualOutputWithLosses(quantized, indices, loss, losses)
    if return_stats:
        return QuantizeOutputWithStats(quantized, indices, loss, stats)
    return QuantizeOutput(quantized, indices, loss)


def merge_groups(outs: list, channel_first: bool, return_losses: bool, return_stats: bool):
    """A grouped stack's output from its groups' (each run with ``return_stats`` and
    ``return_losses``): the quantized channels concatenated (moved to dim 1 with
    ``channel_first``), indices ``(..., groups, Q)``, the mean loss, per-group losses and stats."""
    quantized = torch.cat([o.quantized for o in outs], dim=-1)
    if channel_first:
        quantized = quantized.movedim(-1, 1)
    indices = torch.stack([o.indices for o in outs], dim=-2)
    losses = torch.stack([o.losses for o in outs])
    loss = torch.stack([o.loss for o in outs]).mean()
    stats = [o.stats for o in outs]
    return stack_output(quantized, indices, loss, losses, stats, return_losses, return_stats)


# --- quantize dropout -----------------------------------------------------------------------------


def check_dropout(q: int, cutoff, multiple_of) -> None:
    if not is_int(cutoff) or not 0 <= cutoff < q:
        raise ValueError(
            f"quantize_dropout_cutoff_index must be an int in [0, num_quantizers={q}), "
            f"got {cutoff!r}"
        )
    if not is_int(multiple_of) or multiple_of < 1:
        raise ValueError(
            f"quantize_dropout_multiple_of must be a positive int, got {multiple_of!r}"
        )


def check_active(num_active, q: int) -> None:
    if num_active is not None and (not is_int(num_active) or not 1 <= num_active <= q):
        raise ValueError(
            f"num_active must be None or an int in [1, num_quantizers={q}], got {num_active!r}"
        )


def draw_active(module, q: int, cutoff: int, multiple_of: int) -> int:
    """Depths used by one training forward under quantize dropout (vector-quantize-pytorch's
    rule): the last kept depth ``i`` uniform in ``[cutoff, q)``, then ``i + 1`` rounded up to a
    multiple of ``multiple_of`` (capped at ``q``).

    Drawn from ``module``'s CPU generator (seeded from ``module.seed``: the same on every rank, no
    device sync); the global RNG is not touched."""
    gen = module.random_streams.get("quantize-dropout", "cpu")
    i = cutoff + int(torch.randint(q - cutoff, (), generator=gen))
    module.last_num_active = min(-(-(i + 1) // multiple_of) * multiple_of, q)
    return module.last_num_active


# Per-call draws kept for activation checkpointing's recomputation (one int each, oldest dropped).
REPLAY_DRAWS = 4096


def replayable_draw(module, q: int, cutoff: int, multiple_of: int) -> int:
    """:func:`draw_active` for one training forward, replayed by its recomputation.

    Each call takes one int64 from torch's global CPU RNG as its key (as dropout does) and files
    its draw under it in ``module.dropout_draws``. Activation checkpointing restores that RNG
    before it recomputes a forward, so the recomputation (a forward inside autograd's backward)
    reads its own call's key and replays that call's draw: in either ``use_reentrant`` mode, for
    any number of checkpointed calls before a backward, in any order of recomputation. The key is
    this rank's alone; the draw comes from the seeded stream, the same on every rank, which
    advances once per forward (recomputations draw nothing)."""
    key = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    draws = module.dropout_draws
    if in_backward():
        if key not in draws:
            raise RuntimeError(
                f"{type(module).__name__}: a forward recomputed in backward (activation "
                "checkpointing) has no recorded quantize-dropout draw to replay; checkpoint "
                "with preserve_rng_state=True (the default), or pass num_active"
            )
        module.last_num_active = draws[key]
        return draws[key]
    draws[key] = draw_active(module, q, cutoff, multiple_of)
    draws.move_to_end(key)
    while len(draws) > REPLAY_DRAWS:
        draws.popitem(last=False)
    return draws[key]


# --- the depth loop -------------------------------------------------------------------------------


def frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    """``t``'s value with ``frac`` of its gradient (vector-quantize-pytorch's ``frac_gradient``):
    ``sg(t)`` for ``frac = 0``, else ``frac t + (1 - frac) sg(t)``."""
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


class Depths(NamedTuple):
    """What :func:`run_depths` returns, one entry per depth run."""

    quantized: list  # each depth's output, times its scale
    indices: list  # int64, the layer's index layout
    losses: list  # fp32 0-dim
    stats: list  # CodebookStats, or None without return_stats
    breakdowns: list  # the layer's loss breakdown, or None without return_loss_breakdown


def run_depths(
    layers, residual: torch.Tensor, mask: torch.Tensor | None, *, scales=None,
    detach: bool = False, quant_grad_frac: float = 0.0, return_stats: bool = False,
    **layer_kwargs,
) -> Depths:  # fmt: skip
    """The depth loop of every residual stack: ``layer_i(r_i / s_i, mask=mask)``, its output
    times ``s_i``, ``r_{i+1} = r_i - q_i`` with ``quant_grad_frac`` of ``q_i``'s gradient.

    Args:
        layers: the depths to run, each a layer of the family: ``layer(x, mask=..., return_stats=
            ..., **layer_kwargs)`` returns ``(quantized, indices, loss[, stats])``.
        residual: ``r_0``, ``(..., d)`` in the layers' input layout.
        mask: optional bool, ``residual``'s shape without the channel dim, given to every layer.
        scales: None, or one ``s_i`` per layer (broadcast against ``(..., d)``).
        detach: each depth's output detached (the caller routes the gradient to ``r_0``).
        quant_grad_frac: the fraction of ``q_i``'s gradient that flows into ``r_{i+1}``.
        return_stats: collect each layer's :class:`~fastvq.CodebookStats`.
        layer_kwargs: given to every layer's forward (``return_loss_breakdown=True``: the
            layers' breakdowns are collected).

    Returns:
        :class:`Depths`, lists in depth order.
    """
    qs, idx, losses, stats, bds = [], [], [], [], []
    for depth, layer in enumerate(layers):
        s = None if scales is None else scales[depth]
        x = residual if s is None else residual / s
        out = layer(x, mask=mask, return_stats=return_stats, **layer_kwargs)
        q = out.quantized if s is None else out.quantized * s
        if detach:
            q = q.detach()
        residual = residual - frac_gradient(q, quant_grad_frac)
        qs.append(q)
        idx.append(out.indices)
        losses.append(out.loss)
        stats.append(out.stats if return_stats else None)
        bds.append(getattr(out, "breakdown", None))
    return Depths(qs, idx, losses, stats, bds)


def sum_depths(qs: list) -> torch.Tensor:
    """The depths' outputs summed in depth order (as :meth:`ResidualStack.codes_from_indices`
    sums the decoded codes, so the two agree bit for bit)."""
    total = qs[0]
    for q in qs[1:]:
        total = total + q
    return total


def _check_positive(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class ResidualStack(nn.Module):
    """A residual stack over layers of an implicit-codebook family (each has ``codebook_dim``,
    ``codebook_size`` and ``grid_codes(indices)``, and no projection of its own).

    Args:
        layers: the Q depth layers, built by the family (their per-depth options are the
            family's hook, e.g. LFQ's ``codebook_scale``).
        dim: channels of the input (default the layers' ``codebook_dim``; otherwise one
            projection in and out shared by all depths, ``projection_has_bias``).
        scales: None or fp32 ``(Q, codebook_dim)``: the residual's scale per depth.
        input_clamp: None or fp32 ``c`` (a scalar or one per channel): ``r_0 = tanh(z / c) c``.
        channel_first: ``x`` is ``(B, dim, ...)``.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: as
            :class:`~fastvq.ResidualVQ` (``seed`` seeds the draw).

    The depths run in fp32 with autocast off; ``forward`` returns ``(quantized, indices,
    loss)``, indices int64 ``x``'s shape without the channel dim plus ``(Q,)`` (``-1`` for a
    dropped depth), ``loss`` the fp32 sum of the depths' losses (``return_losses``: ``(Q,)``;
    ``return_stats``: per depth :class:`~fastvq.CodebookStats` or None).
    """

    def __init__(
        self, layers, dim: int | None = None, *, scales: torch.Tensor | None = None,
        input_clamp: torch.Tensor | None = None, channel_first: bool = False,
        quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1, projection_has_bias: bool = True, seed: int = 0,
    ):  # fmt: skip
        super().__init__()
        layers = list(layers)
        q = len(layers)
        d = layers[0].codebook_dim
        self.codebook_dim, self.codebook_size = d, layers[0].codebook_size
        self.dim = d if dim is None else dim
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be None or a positive int, got {dim!r}")
        check_dropout(q, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.num_quantizers, self.channel_first = q, bool(channel_first)
        self.quantize_dropout = bool(quantize_dropout) and q > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        proj = self.dim != d
        bias = projection_has_bias
        # projections before the layers: vqp's state_dict key order
        self.project_in = nn.Linear(self.dim, d, bias=bias) if proj else nn.Identity()
        self.project_out = nn.Linear(d, self.dim, bias=bias) if proj else nn.Identity()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("scales", scales, False)
        self.register_buffer("input_clamp", input_clamp, False)
        self.seed = seed
        self.random_streams = RandomStreams(seed)  # quantize dropout (saved by fastvq.app.rng)
        self.last_num_active = None
        self.dropout_draws = OrderedDict()  # per-call draws, replayed by recomputations

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

    def quantize(self, x: torch.Tensor, keep, num_active: int, return_stats: bool = False,
                 **layer_kwargs) -> tuple[torch.Tensor, Depths]:  # fmt: skip
        """The stack on rows ``x`` (N, dim): ``(total, depths)``, ``total`` fp32
        (N, codebook_dim) the sum of the depths' scaled codes (before ``project_out``),
        ``depths`` :class:`Depths` of the first ``num_active`` depths (indices int64 (N,)).
        ``keep``: optional bool (N,), True for real rows."""
        if keep is not None:  # masked rows: detached and finite, so no NaN reaches a gradient
            x = torch.where(keep[:, None], x, x.detach().nan_to_num(0.0))
        w = getattr(self.project_in, "weight", None)
        if w is not None and x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        z = self.project_in(x)
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(torch.float32)
            c = self.input_clamp
            if c is not None:
                z = (z / c).tanh() * c
            depths = run_depths(
                self.layers[:num_active], z, keep, scales=self.scales,
                return_stats=return_stats, **layer_kwargs,
            )  # fmt: skip
        return sum_depths(depths.quantized), depths

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        return_losses: bool = False, num_active: int | None = None, **layer_kwargs,
    ):  # fmt: skip
        """Quantize ``x`` (``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``) with
        every depth, or the first ``num_active``; ``mask`` bool, ``x``'s shape without the
        channel dim (True = real row: masked rows output their code, pass no gradient and count
        in no loss or statistic); ``layer_kwargs`` go to every depth's forward."""
        check_input(x, self.dim, self.channel_first)
        if self.channel_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        if mask is not None:
            check_mask(mask, lead)
        num_active = self.num_active_for(num_active)
        n = math.prod(lead)
        keep = None if mask is None else mask.reshape(n)
        total, depths = self.quantize(
            x.reshape(n, self.dim), keep, num_active, return_stats, **layer_kwargs
        )  # fmt: skip
        out = self.project_out(total)
        if out.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            out = out.to(x.dtype)
        quantized = out.reshape(*lead, self.dim)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        dropped = self.num_quantizers - num_active
        idx = depths.indices + [torch.full_like(depths.indices[0], -1)] * dropped
        indices = torch.stack(idx, dim=-1).reshape(*lead, self.num_quantizers)
        losses = torch.stack(depths.losses).float()
        loss = losses.sum()
        losses = F.pad(losses, (0, dropped))
        stats = depths.stats + [None] * dropped
        bd = None
        if depths.breakdowns[0] is not None:  # each term per depth, (Q,)
            terms = zip(*depths.breakdowns, strict=True)
            kind = type(depths.breakdowns[0])
            bd = kind(*(F.pad(torch.stack(t).float(), (0, dropped)) for t in terms))
        return stack_output(
            quantized, indices, loss, losses, stats, return_losses, return_stats, bd
        )  # fmt: skip

    def check_indices(self, indices: torch.Tensor, check: bool = True) -> None:
        """TypeError/ValueError for ``(..., Q)`` indices the stack cannot decode."""
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
            c = self.layers[depth].grid_codes(i.clamp_min(0))
            if self.scales is not None:
                c = c * self.scales[depth]
            out.append(torch.where((i >= 0).unsqueeze(-1), c, 0.0))
        return torch.stack(out, dim=-2)

    def codes_from_indices(self, indices: torch.Tensor, *, dtype: torch.dtype | None = None,
                           check: bool = True) -> torch.Tensor:  # fmt: skip
        """Decode ``(..., Q)`` indices (``-1``: no code) to the module's output (eval, no noise:
        bit-identical to forward); ``dtype``: the input's dtype the output should match.
        Returns ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``."""
        codes = self.depth_codes(indices, check=check)
        out = self.project_out(sum_depths(list(codes.unbind(-2))))
        out = out if dtype is None else out.to(dtype)
        return out.movedim(-1, 1) if self.channel_first else out


class GroupedResidualStack(nn.Module):
    """``groups`` residual stacks over equal slices of the channel dim (as
    :class:`~fastvq.GroupedResidualVQ`): indices ``(..., groups, Q)``, ``loss`` the groups'
    mean, one quantize-dropout draw per forward for every group.

    Args:
        dim: channels of the input, divisible by ``groups``.
        groups: number of groups.
        make_stack: ``make_stack(g, dim // groups)`` builds group ``g``'s
            :class:`ResidualStack` (channel-last: the grouped module moves the channels).
        channel_first: ``x`` is ``(B, dim, ...)``.
    """

    def __init__(self, dim: int, groups: int, make_stack, *, channel_first: bool = False):
        super().__init__()
        _check_positive("groups", groups)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim % groups:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by groups ({groups})")
        self.dim, self.groups, self.channel_first = dim, groups, bool(channel_first)
        self.rvqs = nn.ModuleList(make_stack(g, dim // groups) for g in range(groups))
        first = self.rvqs[0]
        self.num_quantizers, self.codebook_size = first.num_quantizers, first.codebook_size

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        return_losses: bool = False, num_active: int | None = None, **layer_kwargs,
    ):  # fmt: skip
        """As :meth:`ResidualStack.forward`, per group: indices ``(..., groups, Q)``, losses
        ``(groups, Q)``, stats a list per group."""
        check_input(x, self.dim, self.channel_first)
        if self.channel_first:
            x = x.movedim(1, -1)
        num_active = self.rvqs[0].num_active_for(num_active)  # one draw for every group
        outs = [
            rvq(chunk, mask, return_stats=True, return_losses=True, num_active=num_active,
                **layer_kwargs)
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=-1), strict=True)
        ]  # fmt: skip
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
