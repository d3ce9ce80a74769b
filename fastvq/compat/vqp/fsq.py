"""vqp's ``FSQ``, ``ResidualFSQ`` and ``GroupedResidualFSQ`` (vector-quantize-pytorch 1.32.0)
on :class:`fastvq.FSQ` and :mod:`fastvq.residual_fsq`.

vqp's argument names and defaults, its layouts (an input of 4+ dims is channel-first; residual
indices channel-first with ``is_channel_first``; grouped indices group-first), its return values
(``(out, indices)``, int32 indices, int64 once a depth was dropped) and its ``state_dict`` keys
(``project_in.*``, ``project_out.*``; the grids are non-persistent buffers). The bound is vqp's
(``half_l = (L - 1)(1 + eps) / 2``: ``bound_margin=-1e-3``), so outputs, indices and gradients
agree with vqp's (tests/test_fsq_vqp.py). Differences (docs/fsq.md): ``noise_dropout`` is the
paper's noise (uniform, one grid step wide, on the bounded value) where vqp adds ``U(-1/2, 1/2)``
to the rounded code and clamps; the quantization always runs in fp32. An argument this front end
cannot honour raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from ...fsq import FSQ as _FSQ
from ...residual_fsq import ResidualFSQ as _ResidualFSQ
from ...stack import check_active
from .residual import GroupedStack, ImplicitStackFront

__all__ = ["FSQ", "GroupedResidualFSQ", "ResidualFSQ"]

VQP_BOUND_MARGIN = -1e-3  # vqp's bound: half_l = (L - 1) * (1 + 1e-3) / 2


def _unsupported(cls: str, name: str, value) -> NotImplementedError:
    return NotImplementedError(
        f"fastvq.compat.vqp.{cls}: {name}={value!r} is not supported by this front end "
        "(see docs/fsq.md, 'Coming from vector-quantize-pytorch')"
    )


def _check_fsq_options(cls, allowed_dtypes, force_quantization_f32, orthogonal_rotation):
    if not force_quantization_f32:
        raise _unsupported(cls, "force_quantization_f32", force_quantization_f32)
    low = [dt for dt in allowed_dtypes if dt not in (torch.float32, torch.float64)]
    if low:  # vqp would round in that dtype: indices inexact past its integer range
        raise _unsupported(cls, "allowed_dtypes", tuple(allowed_dtypes))
    if orthogonal_rotation:
        raise _unsupported(cls, "orthogonal_rotation", orthogonal_rotation)


class FSQ(_FSQ):
    """vqp's ``FSQ(levels, dim=None, num_codebooks=1, ...)``: ``forward(z) -> (out, indices)``.

    Args:
        levels: values per channel, a sequence of ints >= 2 (2 only with ``preserve_symmetry``);
            ``codebook_size = prod(levels)``.
        dim: channels of the input; default ``len(levels) * num_codebooks``, otherwise a linear
            projection in and out.
        num_codebooks: split the projected channels into this many groups of ``len(levels)``,
            each with its own index.
        keep_num_codebooks_dim: indices keep a trailing dim of size ``num_codebooks`` (size 1
            included); None: ``num_codebooks > 1``. False with ``num_codebooks > 1``: ValueError.
        scale: stored as ``self.scale`` and unused (as in vqp).
        allowed_dtypes: vqp's dtypes quantized without an fp32 cast; fastvq always quantizes in
            fp32 and accepts only float32/float64 here (others: NotImplementedError).
        channel_first: ``z`` is ``(B, dim, ...)`` (an input of 4+ dims is channel-first anyway);
            the output keeps that layout, the indices are ``(B, ...)``.
        projection_has_bias: the bias of the ``project_in`` / ``project_out`` linears.
        return_indices: False: ``forward`` returns ``(out, None)``.
        force_quantization_f32: must be True (False raises NotImplementedError): the
            quantization always runs in fp32 with autocast off.
        preserve_symmetry: the symmetric bound of Parker et al. 2024: ``L`` values evenly spaced
            over ``[-1, 1]`` for every ``L`` (even ones and 2 included).
        noise_dropout: in training, the probability in [0, 1] that an element is its bounded value
            plus uniform noise one grid step wide (not vqp's noise); needs ``preserve_symmetry``.
        bound_hard_clamp: clamp to ``[-1, 1]`` instead of ``tanh`` in the bound (for inputs
            already in range).
        orthogonal_rotation: vqp's rotation of the codes: not supported (True raises
            NotImplementedError).
    """

    def __init__(
        self, levels, dim: int | None = None, num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None, scale: float | None = None,
        allowed_dtypes: tuple = (torch.float32, torch.float64), channel_first: bool = False,
        projection_has_bias: bool = True, return_indices: bool = True,
        force_quantization_f32: bool = True, preserve_symmetry: bool = False,
        noise_dropout: float = 0.0, bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):  # fmt: skip
        _check_fsq_options("FSQ", allowed_dtypes, force_quantization_f32, orthogonal_rotation)
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as vqp)")
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks == 1 (as vqp)")
        super().__init__(
            list(levels), dim, num_codebooks=num_codebooks,
            projection_has_bias=projection_has_bias, preserve_symmetry=preserve_symmetry,
            noise_dropout=noise_dropout, bound_margin=VQP_BOUND_MARGIN,
            hard_clamp=bound_hard_clamp,
        )  # fmt: skip
        self.keep_num_codebooks_dim = keep
        self.return_indices = return_indices
        self.vqp_channel_first = channel_first
        self.scale = scale  # unused, as in vqp
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.force_quantization_f32 = True

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """vqp's buffer, computed on demand: fp32 ``(codebook_size, len(levels))``."""
        return self.get_codebook()

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.index_levels(indices)

    def forward(self, z: torch.Tensor):
        """vqp's forward: ``(out, indices)``, ``out`` like ``z``, ``indices`` int32 ``(B, ...)``
        (plus ``num_codebooks`` with ``keep_num_codebooks_dim``), or None without
        ``return_indices``.

        Args:
            z: float tensor ``(B, ..., dim)``, or ``(B, dim, ...)`` when it has 4+ dims or with
                ``channel_first``.
        """
        move = z.ndim >= 4 or self.vqp_channel_first
        if move:
            z = z.movedim(1, -1)
        out, indices, _ = super().forward(z)
        if move:
            out = out.movedim(-1, 1)
        if not self.return_indices:
            return out, None
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.unsqueeze(-1)
        return out, indices.to(torch.int32)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """vqp's inverse of the indices: ``(b, ..., dim)``, channel-first for an image layout.

        Args:
            indices: int tensor in ``forward``'s index layout (not range-checked); with 3+ dims
                besides the codebook dim, or ``channel_first``, the output is ``(b, dim, ...)``.
        """
        img = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.squeeze(-1)
        out = self.codes_from_indices(indices, check=False)
        return out.movedim(-1, 1) if img or self.vqp_channel_first else out


def _fsq_kwargs(cls: str, kwargs: dict) -> dict:
    """vqp's ``**kwargs`` to its residual FSQ layers, mapped onto fastvq's FSQ options."""
    kw = dict(kwargs)
    _check_fsq_options(
        cls, kw.pop("allowed_dtypes", (torch.float32,)), kw.pop("force_quantization_f32", True),
        kw.pop("orthogonal_rotation", False),
    )  # fmt: skip
    kw.pop("scale", None)  # unused, as in vqp
    kw.pop("projection_has_bias", None)  # the layers have no projection in vqp's stack
    for name in ("num_codebooks", "return_indices", "keep_num_codebooks_dim", "channel_first"):
        if name in kw:
            raise _unsupported(cls, name, kw[name])
    out = {"bound_margin": VQP_BOUND_MARGIN}
    if "noise_dropout" in kw:
        out["noise_dropout"] = kw.pop("noise_dropout")
    if kw:
        name = sorted(kw)[0]
        raise TypeError(f"{cls} got an unexpected keyword argument {name!r}")
    return out


class ResidualFSQ(ImplicitStackFront, _ResidualFSQ):
    """vqp's ``ResidualFSQ(*, levels, num_quantizers, dim=None, ...)``:
    ``forward(x) -> (out, indices[, all_codes])``.

    Args:
        levels: values per channel of every depth, a sequence of ints >= 2 (``codebook_size =
            prod(levels)``); depth ``i`` quantizes the residual times ``levels**i``.
        num_quantizers: depths Q.
        dim: channels of the input; default ``len(levels)``, otherwise one linear projection in
            and out (with bias) shared by all depths.
        is_channel_first: ``x`` is ``(B, dim, ...)`` and the indices ``(B, Q, ...)``; otherwise
            ``(..., dim)`` and ``(..., Q)``.
        quantize_dropout: in training with gradients on, run only the first n depths, n drawn
            per forward; the dropped depths give index -1. Off when ``num_quantizers`` is 1.
        quantize_dropout_cutoff_index: the last kept depth is drawn from ``[cutoff,
            num_quantizers)``: at least ``cutoff + 1`` depths run (outside that range: ValueError).
        quantize_dropout_multiple_of: the number of depths kept is rounded up to a multiple of
            this positive int (at most ``num_quantizers``).
        soft_clamp_input_value: ``c`` of the input clamp ``tanh(r / c) c`` after ``project_in``
            (a float or one per channel, > 0); None: no clamp. Needs ``bound_hard_clamp=False``.
        bound_hard_clamp: each depth's bound clamps to ``[-1, 1]`` instead of ``tanh``, and the
            input is soft-clamped with ``c = 1 + 1 / (levels - 1)`` (vqp's default).
    """

    def __init__(
        self, *, levels, num_quantizers: int, dim: int | None = None,
        is_channel_first: bool = False, quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value=None, bound_hard_clamp: bool = True, **kwargs,
    ):  # fmt: skip
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError("soft_clamp_input_value needs bound_hard_clamp=False (as vqp)")
        super().__init__(
            list(levels), num_quantizers, dim, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            preserve_symmetry=True, hard_clamp=bound_hard_clamp,
            soft_clamp_input_value=soft_clamp_input_value,
            **_fsq_kwargs("ResidualFSQ", kwargs),
        )  # fmt: skip
        self.is_channel_first = is_channel_first
        self.has_projections = self.dim != self.codebook_dim

    @property
    def codebooks(self) -> torch.Tensor:
        """``(Q, codebook_size, len(levels))``: every depth's grid, unscaled (as vqp)."""
        return torch.stack([layer.get_codebook() for layer in self.layers])

    def forward(self, x, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed=None):
        """vqp's forward: ``(out, indices)``, ``out`` like ``x``, ``indices`` int32 (int64 once a
        depth was dropped), -1 for a dropped depth; ``return_all_codes`` adds the codes.

        Args:
            x: float tensor ``(..., dim)``, or ``(B, dim, ...)`` with ``is_channel_first``.
            return_all_codes: also return each depth's scaled code ``(Q, ..., len(levels))``
                (channel-last, before ``project_out``; 0 for a dropped depth).
            rand_quantize_dropout_fixed_seed: seed of the quantize-dropout draw
                (``random.Random(seed)``, as vqp); None: the module's own seeded draw (replayed
                under activation checkpointing), not vqp's. Used only when dropout applies.
        """
        num_active = self.vqp_num_active(rand_quantize_dropout_fixed_seed)
        return self.forward_active(x, return_all_codes, num_active)

    def forward_active(self, x, return_all_codes: bool, num_active: int):
        """vqp's forward with the first ``num_active`` depths.

        Args:
            x: as :meth:`forward`.
            return_all_codes: as :meth:`forward`.
            num_active: depths to run, an int in ``[1, num_quantizers]`` (ValueError otherwise;
                None: all), the rest index -1; no dropout draw, whatever the mode.
        """
        check_active(num_active, self.num_quantizers)
        num_active = self.num_quantizers if num_active is None else num_active
        if self.is_channel_first:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        total, depths = self.quantize(x.reshape(-1, self.dim), None, num_active)
        out = self.project_out(total).reshape(*lead, self.dim)
        dropped = self.num_quantizers - num_active
        idx = depths.indices
        # int32 as vqp's; its -1 fill is int64, so a dropped depth promotes the stack (as vqp)
        idx = [i.to(torch.int32) for i in idx] + [torch.full_like(idx[0], -1)] * dropped
        indices = torch.stack(idx, dim=-1).reshape(*lead, self.num_quantizers)
        codes = self.get_codes_from_indices(indices) if return_all_codes else None
        if self.is_channel_first:
            out, indices = out.movedim(-1, 1), indices.movedim(-1, 1)
        return (out, indices) if codes is None else (out, indices, codes)


class GroupedResidualFSQ(GroupedStack, nn.Module):
    """vqp's ``GroupedResidualFSQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``:
    indices ``(groups, ...)``; one quantize-dropout draw for every group.

    Args:
        dim: channels of the input, divisible by ``groups`` (ValueError otherwise).
        groups: number of :class:`ResidualFSQ` stacks, each on ``dim // groups`` consecutive
            channels; ``**kwargs`` go to every stack.
        accept_image_fmap: split the channels along dim 1 instead of the last dim; the stacks
            read channel-first chunks only with ``is_channel_first=True`` (as vqp).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x, return_all_codes: bool = False):
        """vqp's forward: ``(out, indices)``, ``out`` like ``x``, indices ``(groups, ...)`` (each
        group's as :meth:`ResidualFSQ.forward`); ``return_all_codes`` adds a tuple of codes.

        Args:
            x: float tensor ``(..., dim)``, or ``(B, dim, ...)`` with ``accept_image_fmap``.
            return_all_codes: also return a tuple of each group's codes ``(Q, ..., len(levels))``.
        """
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} channels in dim {self.split_dim}")
        first = self.rvqs[0]
        num_active = first.vqp_num_active(None)  # one draw for every group
        outs = []
        for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim), strict=True):
            outs.append(rvq.forward_active(chunk, return_all_codes, num_active))
        quantized = torch.cat([o[0] for o in outs], dim=self.split_dim)
        indices = torch.stack([o[1] for o in outs])
        if return_all_codes:
            return quantized, indices, tuple(o[2] for o in outs)
        return quantized, indices
