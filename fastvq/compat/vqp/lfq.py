"""vqp's ``LFQ``, ``ResidualLFQ`` and ``GroupedResidualLFQ`` (vector-quantize-pytorch 1.32.0) on
:class:`fastvq.LFQ` and :mod:`fastvq.residual_lfq`.

vqp's keyword-only arguments and defaults, its layouts (an input of 4+ dims is channel-first
unless ``channel_first`` says otherwise), its return values (``(quantized, indices,
entropy_aux_loss)``, then ``(per_sample_entropy, batch_entropy, commitment)`` with
``return_loss_breakdown``), int64 indices and its ``state_dict`` keys (the persistent bit-weight
buffer ``mask``, ``project_in.*``, ``project_out.*``). The entropies take vqp's
``log(clamp(p, 1e-5))`` (``prob_floor=1e-5``), computed in chunks of codes, so the front end
never builds vqp's ``N x 2^d`` matrices. Differences (docs/lfq.md): a ``mask`` of shape
``(b, n)`` excludes its rows from both entropies (vqp then computes its batch entropy per row,
equal to the per-sample entropy); masked rows pass no gradient; in training the output is the
code itself (vqp: ``x + (code - x).detach()``, the code up to rounding); the row fraction of
``frac_per_sample_entropy`` comes from fastvq's stream. The residual forms keep vqp's stack
(depth ``i``'s codes ``+-2^-i``, its soft clamp halved per depth, ``(Q,)`` losses, ``state_dict``
keys ``project_in.*``, ``project_out.*``, ``layers.{i}.mask``); their quantize dropout draws as
the FSQ front end's, and ``get_codes_from_indices`` of a spherical stack decodes the forward's
codes (vqp's decodes codes off the sphere). An argument this front end cannot honour raises
``NotImplementedError`` naming it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ...lfq import LFQ as _LFQ
from ...lfq import lfq_codes
from ...residual_lfq import ResidualLFQ as _ResidualLFQ
from .residual import GroupedStack, ImplicitStackFront

__all__ = ["GroupedResidualLFQ", "LFQ", "LFQLossBreakdown", "LFQReturn", "ResidualLFQ"]

VQP_PROB_FLOOR = 1e-5  # vqp's log(t.clamp(min=1e-5))


class LFQReturn(NamedTuple):
    """vqp's ``Return``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    entropy_aux_loss: torch.Tensor


class LFQLossBreakdown(NamedTuple):
    """vqp's ``LossBreakdown`` (detached here)."""

    per_sample_entropy: torch.Tensor
    batch_entropy: torch.Tensor
    commitment: torch.Tensor


def _unsupported(cls: str, name: str, value) -> NotImplementedError:
    return NotImplementedError(
        f"fastvq.compat.vqp.{cls}: {name}={value!r} is not supported by this front end "
        "(see docs/lfq.md, 'Coming from vector-quantize-pytorch')"
    )


def _lfq_options(
    cls: str, *, entropy_loss_weight=0.1, commitment_loss_weight=0.0, diversity_gamma=1.0,
    straight_through_activation=None, frac_per_sample_entropy=1.0, projection_has_bias=True,
    soft_clamp_input_value=None, cosine_sim_project_in=False, cosine_sim_project_in_scale=None,
    experimental_softplus_entropy_loss=False, entropy_loss_offset=5.0, spherical=False,
    force_quantization_f32=True, orthogonal_rotation=False,
) -> dict:  # fmt: skip
    """vqp's ``LFQ`` options (its names and defaults) that every layer takes, mapped onto
    :class:`fastvq.LFQ`'s; NotImplementedError naming one this front end cannot honour.
    ``entropy_loss_offset`` is unused, as in vqp without the softplus."""
    act = straight_through_activation
    if act is not None and type(act) is not nn.Identity:
        raise _unsupported(cls, "straight_through_activation", act)
    for name, value in (
        ("cosine_sim_project_in", cosine_sim_project_in),
        ("experimental_softplus_entropy_loss", experimental_softplus_entropy_loss),
        ("orthogonal_rotation", orthogonal_rotation),
    ):
        if value:
            raise _unsupported(cls, name, value)
    if not force_quantization_f32:
        raise _unsupported(cls, "force_quantization_f32", force_quantization_f32)
    return dict(
        entropy_loss_weight=entropy_loss_weight, commitment_loss_weight=commitment_loss_weight,
        diversity_gamma=diversity_gamma, spherical=spherical,
        frac_per_sample_entropy=frac_per_sample_entropy,
        soft_clamp_input_value=soft_clamp_input_value, inv_temperature=100.0,
        prob_floor=VQP_PROB_FLOOR, projection_has_bias=projection_has_bias,
    )  # fmt: skip


def _check_codebook_size(codebook_size) -> None:
    if codebook_size is not None and not math.log2(codebook_size).is_integer():
        raise ValueError(f"codebook_size must be a power of 2, got {codebook_size!r}")


class LFQDepth(_LFQ):
    """:class:`fastvq.LFQ` with vqp's persistent bit-weight buffer ``mask`` (its ``state_dict``
    key) and its ``codebook``: the base of :class:`LFQ` and the depth of :class:`ResidualLFQ`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", self.bit_shifts.new_ones(()) << self.bit_shifts)

    @property
    def codebook(self) -> torch.Tensor:
        """vqp's buffer, computed on demand: ``(codebook_size, d)`` of ``+-codebook_scale``
        (not on the sphere, as vqp's, even with ``spherical``)."""
        k = torch.arange(self.codebook_size, device=self.bit_shifts.device)
        bits = ((k[:, None] >> self.bit_shifts) & 1).bool()
        return lfq_codes(bits, self.codebook_scale, False)


class LFQ(LFQDepth):
    """vqp's ``LFQ(*, dim=None, codebook_size=None, ...)``:
    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None)``.

    Args:
        dim: channels of the input; None: ``log2(codebook_size) * num_codebooks``.
        codebook_size: codes per codebook, a power of 2 (ValueError otherwise); None:
            ``2 ** dim``. One of ``dim`` and ``codebook_size`` is required.
        num_codebooks: codebooks the projected channels are split into, ``log2(codebook_size)``
            bits each; ``indices`` gain a trailing dim of this size.
        keep_num_codebooks_dim: keep that trailing dim in ``indices`` (size 1 for one codebook);
            None: ``num_codebooks > 1``. False with ``num_codebooks > 1``: ValueError.
        codebook_scale: ``s``, the codes' magnitude per channel (``+-s``; with ``spherical``,
            their norm).
        has_projections: force the linear projections in and out on or off (fastvq's
            ``projections``); None: on when ``dim != num_codebooks * log2(codebook_size)``.
        channel_first: True: inputs (and ``indices_to_codes``' output) are ``(b, dim, ...)``;
            False: channel-last; None: channel-first for inputs of 4+ dims, as vqp.
        **options: vqp's other LFQ keywords. ``entropy_loss_weight``, ``commitment_loss_weight``,
            ``diversity_gamma``, ``frac_per_sample_entropy``, ``spherical``,
            ``soft_clamp_input_value``, ``projection_has_bias`` go to :class:`fastvq.LFQ`;
            ``entropy_loss_offset``, ``cosine_sim_project_in_scale`` are accepted and unused;
            ``straight_through_activation``, ``cosine_sim_project_in``,
            ``experimental_softplus_entropy_loss``, ``orthogonal_rotation``,
            ``force_quantization_f32`` must keep vqp's defaults (else NotImplementedError).
    """

    def __init__(
        self, *, dim=None, codebook_size=None, num_codebooks=1, keep_num_codebooks_dim=None,
        codebook_scale=1.0, has_projections=None, channel_first=None, **options,
    ):  # fmt: skip
        opts = _lfq_options("LFQ", **options)
        _check_codebook_size(codebook_size)
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks == 1 (as vqp)")
        super().__init__(
            dim, codebook_size, num_codebooks=num_codebooks, codebook_scale=codebook_scale,
            projections=has_projections, **opts,
        )  # fmt: skip
        self.keep_num_codebooks_dim = keep
        self.vqp_channel_first = channel_first
        self.entropy_loss_offset = options.get("entropy_loss_offset", 5.0)
        self.force_quantization_f32 = True

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
        """vqp's forward: ``(quantized, indices, entropy_aux_loss)`` (:class:`LFQReturn`).

        Args:
            x: float tensor ``(b, n, dim)`` or ``(..., dim)``; ``(b, dim, ...)`` with
                ``channel_first`` (by default for 4+ dims).
            inv_temperature: ``beta`` of the entropies' code probabilities, the softmax of
                ``-beta ||z - c||^2``; a positive float (ValueError otherwise).
            return_loss_breakdown: return ``(LFQReturn, LFQLossBreakdown)``, the unweighted terms
                detached (zeros in eval; ``commitment`` 0 when ``commitment_loss_weight`` is 0).
            mask: None or bool ``(b, n)``, ``n`` the positions per sample (vqp's packed layout),
                or ``(b,)``; True = real row: False rows count in no loss and pass no gradient.
        """
        move = x.ndim >= 4 if self.vqp_channel_first is None else self.vqp_channel_first
        if move:
            x = x.movedim(1, -1)
        if mask is not None:  # vqp's mask: a prefix of the packed (b, n) layout
            packed = (x.shape[0], math.prod(x.shape[1:-1]))
            mask = mask.reshape(*mask.shape, *[1] * (2 - mask.dim())).expand(packed)
            mask = mask.reshape(x.shape[:-1])
        out = super().forward(
            x, mask, inv_temperature=inv_temperature, return_loss_breakdown=True
        )  # fmt: skip
        quantized, indices = out.quantized, out.indices
        if move:
            quantized = quantized.movedim(-1, 1)
        if self.keep_num_codebooks_dim and self.num_codebooks == 1:
            indices = indices.unsqueeze(-1)
        ret = LFQReturn(quantized, indices, out.loss)
        if not return_loss_breakdown:
            return ret
        return ret, LFQLossBreakdown(*out.breakdown)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """vqp's inverse of the indices: ``(b, ..., dim)``, channel-first for an image layout.

        Args:
            indices: int indices as ``forward`` returns them: ``(b, ...)``, or
                ``(b, ..., num_codebooks)`` with ``keep_num_codebooks_dim``.
            project_out: apply ``project_out`` (identity without projections); False: the codes
                themselves, ``num_codebooks * log2(codebook_size)`` channels.
        """
        img = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        move = img if self.vqp_channel_first is None else self.vqp_channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self.grid_codes(indices).flatten(-2)
        if project_out:
            w = getattr(self.project_in, "weight", None)
            codes = self.project_out(codes if w is None else codes.to(w.dtype))
        return codes.movedim(-1, 1) if move else codes


def _depth_options(cls: str, kwargs: dict) -> dict:
    """vqp's ``**kwargs`` to its residual LFQ layers, mapped onto fastvq's LFQ options."""
    kw = dict(kwargs)
    if "codebook_scale" in kw:  # vqp sets it per depth: its LFQ would get it twice
        raise TypeError(f"{cls} got multiple values for keyword argument 'codebook_scale'")
    for name, ok in (
        ("num_codebooks", lambda v: v == 1),
        ("keep_num_codebooks_dim", lambda v: not v),
        ("has_projections", lambda v: not v),
        ("channel_first", lambda v: not v),
    ):  # vqp's stack asserts its layers have no projection and one codebook
        if name in kw and not ok(kw[name]):
            raise _unsupported(cls, name, kw[name])
        kw.pop(name, None)
    opts = _lfq_options(cls, **kw)
    opts.pop("projection_has_bias")  # the layers have no projection in vqp's stack
    opts.pop("soft_clamp_input_value")  # the stack's own argument
    return opts


class ResidualLFQ(ImplicitStackFront, _ResidualLFQ):
    """vqp's ``ResidualLFQ(*, dim, num_quantizers, codebook_size, ...)``:
    ``forward(x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)``
    returns ``(quantized, indices (..., Q), losses (Q,)[, all_codes (Q, ..., d)])``; depth
    ``i``'s codes are ``+-2^-i``. Inputs are ``(..., dim)`` (vqp's stack takes ``(b, n, dim)``).

    Args:
        dim: channels of the input (its last dim); when not ``log2(codebook_size)``, one linear
            projection in and out (with bias) shared by all depths.
        num_quantizers: depths Q, a positive int.
        codebook_size: codes per depth, a power of 2 (ValueError otherwise).
        quantize_dropout: in training with gradients enabled, run only the first ``k`` depths,
            ``k`` drawn per forward (the rest: index -1, loss 0); off for one quantizer.
        quantize_dropout_cutoff_index: the last kept depth is drawn from
            ``[cutoff, num_quantizers)``; an int in that range (ValueError otherwise).
        quantize_dropout_multiple_of: the number of kept depths is rounded up to a multiple of
            this (at most ``num_quantizers``); a positive int.
        soft_clamp_input_value: None (no clamp) or ``v >= 1``: depth ``i`` clamps its residual to
            ``tanh(r / v_i) v_i``, ``v_i = v 2^-i``, as vqp.
        **kwargs: vqp's LFQ options for every depth, as :class:`LFQ`'s ``**options``
            (``projection_has_bias`` unused: the depths have no projection); ``codebook_scale``:
            TypeError; ``num_codebooks != 1`` or a true ``keep_num_codebooks_dim``,
            ``has_projections`` or ``channel_first``: NotImplementedError.
    """

    depth_class = LFQDepth

    def __init__(
        self, *, dim, num_quantizers, codebook_size, quantize_dropout=False,
        quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None, **kwargs,
    ):  # fmt: skip
        _check_codebook_size(codebook_size)
        super().__init__(
            codebook_size, num_quantizers, dim, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            soft_clamp_input_value=soft_clamp_input_value,
            **_depth_options("ResidualLFQ", kwargs),
        )  # fmt: skip
        self.has_projections = self.dim != self.codebook_dim

    @property
    def codebooks(self) -> torch.Tensor:
        """vqp's ``(Q, codebook_size, d)``: each depth's ``+-2^-i`` codes."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(self, x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        """vqp's forward; see the class docstring.

        Args:
            x: float tensor ``(..., dim)``, channel-last.
            mask: None or bool, ``x``'s shape without the channel dim; True = real row: False
                rows count in no depth's loss and pass no gradient.
            return_all_codes: also return each depth's codes ``(Q, ..., log2(codebook_size))``,
                before ``project_out`` (0 at dropped depths).
            rand_quantize_dropout_fixed_seed: under quantize dropout: an int seeds vqp's draw
                (``random.Random(seed)``); None: the stack's own seeded, replayable draw.
        """
        num_active = self.vqp_num_active(rand_quantize_dropout_fixed_seed)
        return self.forward_active(x, mask, return_all_codes, num_active)

    def forward_active(self, x, mask, return_all_codes: bool, num_active: int):
        """vqp's forward with the first ``num_active`` depths.

        Args:
            x: as :meth:`forward`.
            mask: as :meth:`forward` (None for no mask).
            return_all_codes: as :meth:`forward`.
            num_active: the depths to run, an int in ``[1, num_quantizers]`` (ValueError
                otherwise), in training and eval alike; the rest give index -1 and loss 0.
        """
        out = _ResidualLFQ.forward(self, x, mask, return_losses=True, num_active=num_active)
        ret = (out.quantized, out.indices, out.losses)
        return (*ret, self.get_codes_from_indices(out.indices)) if return_all_codes else ret


class GroupedResidualLFQ(GroupedStack, nn.Module):
    """vqp's ``GroupedResidualLFQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``:
    ``forward(x, mask=None, return_all_codes=False)`` returns ``(quantized, indices (groups,
    ..., Q), losses (groups, Q)[, codes per group])``; one quantize-dropout draw for every
    group.

    Args:
        dim: channels of the input (its last dim), divisible by ``groups`` (ValueError
            otherwise); each group's :class:`ResidualLFQ` gets ``dim // groups``.
        groups: the number of channel groups, one :class:`ResidualLFQ` each.
        accept_image_fmap: must be False (True raises NotImplementedError): inputs are
            channel-last.
        **kwargs: :class:`ResidualLFQ`'s other arguments, the same for every group.
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if accept_image_fmap:  # vqp's stacks would project the wrong dim of (b, d, h, w)
            raise _unsupported("GroupedResidualLFQ", "accept_image_fmap", accept_image_fmap)
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualLFQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x, mask=None, return_all_codes: bool = False):
        """vqp's forward; see the class docstring.

        Args:
            x: float tensor ``(..., dim)``; its last dim is split into the groups.
            mask: as :meth:`ResidualLFQ.forward`, the same for every group.
            return_all_codes: also return a tuple of each group's codes, as
                :meth:`ResidualLFQ.forward`'s.
        """
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} channels in dim {self.split_dim}")
        num_active = self.rvqs[0].vqp_num_active(None)  # one draw for every group
        outs = [
            rvq.forward_active(chunk, mask, return_all_codes, num_active)
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim), strict=True)
        ]
        ret = (
            torch.cat([o[0] for o in outs], dim=self.split_dim),
            torch.stack([o[1] for o in outs]),
            torch.stack([o[2] for o in outs]),
        )
        return (*ret, tuple(o[3] for o in outs)) if return_all_codes else ret
