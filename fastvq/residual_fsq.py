"""``ResidualFSQ`` and ``GroupedResidualFSQ``: :class:`~fastvq.FSQ` on the family-wide
residual stack (:mod:`fastvq.stack`).

    r_0 = clamp(project_in(x));  (c_i, idx_i) = FSQ_i(r_i / s_i);  q_i = s_i c_i
    r_{i+1} = r_i - sg(q_i);     quantized = project_out(sum_i q_i)

with FSQ's per-depth hooks: the residual scale ``s_i = levels^-i`` (each depth resolves the
grid step the previous one left) and the input clamp ``clamp(r) = tanh(r / c) c``,
``c = 1 + 1 / (levels - 1)`` (vector-quantize-pytorch's ``soft_clamp_input_value``). Quantize
dropout, its replay under activation checkpointing, the output tuples and decoding are the
stack's: a depth left out gives index ``-1`` and no code. FSQ has no state, so a stack issues no
collective and needs no cross-rank check; the dropout draw comes from the module's seeded
stream, the same on every rank.
"""

from __future__ import annotations

import torch

from .fsq import FSQ
from .stack import GroupedResidualStack, ResidualStack

__all__ = ["GroupedResidualFSQ", "ResidualFSQ"]


class ResidualFSQ(ResidualStack):
    """Residual FSQ: ``num_quantizers`` :class:`~fastvq.FSQ` layers of the same ``levels``.

    Args:
        levels: values per channel (as :class:`~fastvq.FSQ`); ``codebook_size = prod(levels)``
            per depth.
        num_quantizers: depths Q.
        dim: channels of the input (default ``len(levels)``; otherwise one projection in and
            out shared by all depths, ``projection_has_bias``).
        channel_first: ``x`` is ``(B, dim, ...)``.
        quantize_dropout: in training, a forward without ``num_active`` runs only the first
            ``n`` depths, ``n`` drawn per forward (the rest give index -1); off when Q is 1.
        quantize_dropout_cutoff_index: in ``[0, Q)``: the last kept depth is drawn uniformly
            from ``[cutoff, Q)``, so at least ``cutoff + 1`` depths run.
        quantize_dropout_multiple_of: round the number of kept depths up to a multiple of this
            (capped at Q), as :class:`~fastvq.ResidualVQ`.
        preserve_symmetry: each depth's FSQ ``preserve_symmetry`` (default True, as vqp's
            ``ResidualFSQ``: the symmetric grid).
        hard_clamp: each depth's FSQ ``hard_clamp`` (default True, as vqp's ``ResidualFSQ``:
            a clamp to ``[-1, 1]`` instead of ``tanh``; it also turns on the input's soft clamp).
        soft_clamp_input_value: ``c`` of the input clamp ``tanh(r / c) c`` (a float or one per
            channel); default ``1 + 1 / (levels - 1)`` with ``hard_clamp``, none without.
        projection_has_bias: ``project_in`` and ``project_out`` have a bias (when ``dim !=
            len(levels)``).
        seed: seeds the quantize-dropout draw (a CPU generator, the same on every rank).
        **fsq_kwargs: every other FSQ option (``bound_margin``, ``noise_dropout``).

    ``forward`` (:meth:`~fastvq.stack.ResidualStack.forward`) returns ``(quantized, indices,
    loss)``, indices int64 ``x``'s shape without the channel dim plus ``(Q,)``, ``-1`` for a
    dropped depth; ``loss`` zero (``return_losses``: ``(Q,)`` zeros; ``return_stats``: per depth
    :class:`~fastvq.CodebookStats` or None).
    """

    def __init__(
        self, levels, num_quantizers: int, dim: int | None = None, *,
        channel_first: bool = False, quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
        preserve_symmetry: bool = True, hard_clamp: bool = True,
        soft_clamp_input_value=None, projection_has_bias: bool = True, seed: int = 0,
        **fsq_kwargs,
    ):  # fmt: skip
        q = num_quantizers
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {q!r}")
        for bad in ("dim", "num_codebooks"):
            if bad in fsq_kwargs:
                raise TypeError(f"ResidualFSQ got an unexpected keyword argument {bad!r}")
        layers = [
            FSQ(levels, preserve_symmetry=preserve_symmetry, hard_clamp=hard_clamp, **fsq_kwargs)
            for _ in range(q)
        ]
        lv = torch.tensor(layers[0].levels, dtype=torch.float32)
        clamp = soft_clamp_input_value
        if clamp is None and hard_clamp:
            clamp = 1 + 1 / (lv - 1)
        elif clamp is not None:
            clamp = torch.as_tensor(clamp, dtype=torch.float32)
            if not bool((clamp > 0).all()):
                raise ValueError(
                    f"soft_clamp_input_value must be > 0, got {soft_clamp_input_value!r}"
                )
        super().__init__(
            layers, dim, scales=torch.stack([lv**-i for i in range(q)]),  # fp32, as vqp's
            input_clamp=clamp, channel_first=channel_first, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            projection_has_bias=projection_has_bias, seed=seed,
        )  # fmt: skip
        self.levels = layers[0].levels

    @property
    def soft_clamp_input_value(self) -> torch.Tensor | None:
        """``c`` of the input clamp (fp32), or None."""
        return self.input_clamp

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}, "
            f"quantize_dropout={self.quantize_dropout}"
        )


class GroupedResidualFSQ(GroupedResidualStack):
    """``groups`` :class:`ResidualFSQ` stacks over equal slices of the channel dim (as
    :class:`~fastvq.GroupedResidualVQ`): indices ``(..., groups, Q)``, ``loss`` zero, one
    quantize-dropout draw per forward for every group. Other arguments: :class:`ResidualFSQ`.

    Args:
        levels: FSQ levels of every stage of every group (as :class:`ResidualFSQ`).
        num_quantizers: Q, stages per group.
        dim: channels of the input, divisible by ``groups``.
        groups: stacks, each on ``dim // groups`` consecutive channels.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        seed: group ``g``'s stack gets ``seed + g``; the one quantize-dropout draw per forward
            comes from group 0's stream (``seed``).
    """

    def __init__(self, levels, num_quantizers: int, dim: int, *, groups: int = 1,
                 channel_first: bool = False, seed: int = 0, **kwargs):  # fmt: skip
        super().__init__(
            dim, groups,
            lambda g, d: ResidualFSQ(levels, num_quantizers, d, seed=seed + g, **kwargs),
            channel_first=channel_first,
        )  # fmt: skip
