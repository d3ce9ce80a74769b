"""vqp's ``SimVQ`` and ``ResidualSimVQ`` (vector-quantize-pytorch 1.32.0) on fastvq's SimVQ
:class:`~fastvq.codebook.Codebook` (a frozen basis times any map) and the fused op.

vqp's arguments and defaults (``codebook_transform`` any module, default a bias-free
``nn.Linear(frozen_codebook_dim, dim)``; ``init_fn`` applied to the basis; the rotation trick on;
the commitment loss ``mse(sg(x), q) + input_to_quantize_commit_loss_weight * mse(x, sg(q))``
times ``commitment_weight``), its outputs and its ``state_dict`` keys (``frozen_codebook``,
``code_transform.*``). The basis is drawn from torch's global generator as vqp draws it (so one
seed gives vqp's module), then kept by the ``Codebook``; the search, the loss and the gradients
(straight-through or the rotation trick, to the input; the codebook term to the map) are
:func:`fastvq.functional.quantize_rows`, with no N x K tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..._checks import check_int, check_nonneg_real
from ...codebook import Codebook
from ...functional import quantize_rows
from ...ops import resolve_backend
from .residual import _maybe_sync_seed, vqp_num_active

__all__ = ["ResidualSimVQ", "SimVQ"]

KEYS = {"book.simvq_basis": "frozen_codebook", "book.simvq_transform.": "code_transform."}


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SimVQ(nn.Module):
    """vqp's ``SimVQ``: ``forward(x) -> (quantized, indices, commit_loss)``.

    ``x`` ``(B, ..., dim)`` (``(B, dim, ...)`` with ``channel_first``); ``quantized`` like ``x``;
    ``indices`` int64 ``(B, ...)``; ``commit_loss`` a 0-dim tensor (also in eval, as vqp). The
    codes are ``codebook_transform(frozen_codebook)`` ``(codebook_size, dim)``, the basis
    ``(codebook_size, frozen_codebook_dim)``.

    Args:
        dim: channels of the input and of the codes, a positive int.
        codebook_size: the number of codes, a positive int.
        codebook_transform: any module mapping the basis to the codes ``(codebook_size, dim)``
            (vqp's ``code_transform``); None: a bias-free ``nn.Linear(frozen_codebook_dim, dim)``.
        init_fn: applied to the drawn basis ``randn(codebook_size, frozen_codebook_dim) /
            sqrt(frozen_codebook_dim)``; must return a tensor of that shape (ValueError).
        channel_first: ``x``, ``quantized`` and ``indices_to_codes``' output are ``(B, dim, ...)``.
        rotation_trick: the gradient to ``x`` through the rotation trick; False: straight-through.
        input_to_quantize_commit_loss_weight: weight (>= 0) of ``mse(x, sg(q))``, the term that
            pulls the input to its code, next to ``mse(sg(x), q)`` that trains the map.
        commitment_weight: factor (>= 0) on the whole loss.
        frozen_codebook_dim: the basis' width; None: ``dim``.
        backend: (fastvq only) ``"auto"``, ``"torch"`` or ``"triton"`` for the search.
    """

    def __init__(
        self, dim: int, codebook_size: int, codebook_transform: nn.Module | None = None,
        init_fn: Callable = _identity, channel_first: bool = False, rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25, commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None, *, backend: str = "auto",
    ):  # fmt: skip
        super().__init__()
        dim = check_int("dim", dim, 1)
        codebook_size = check_int("codebook_size", codebook_size, 1)
        fdim = frozen_codebook_dim
        fdim = dim if fdim is None else check_int("frozen_codebook_dim", fdim, 1)
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(
                f"codebook_transform must be an nn.Module or None, got {type(codebook_transform)}"
            )
        if not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn)}")
        check_nonneg_real(
            "input_to_quantize_commit_loss_weight", input_to_quantize_commit_loss_weight
        )
        check_nonneg_real("commitment_weight", commitment_weight)
        # vqp's order of draws: the basis from the global generator, then the default map
        basis = init_fn(torch.randn(codebook_size, fdim) * fdim**-0.5)
        if not isinstance(basis, torch.Tensor) or tuple(basis.shape) != (codebook_size, fdim):
            raise ValueError(
                f"init_fn must return a ({codebook_size}, {fdim}) tensor, got "
                f"{getattr(basis, 'shape', type(basis))}"
            )
        transform = codebook_transform
        if transform is None:
            transform = nn.Linear(fdim, dim, bias=False)
        self.book = Codebook(
            1, codebook_size, fdim, learning="simvq", init=basis, simvq_map=transform,
            grouped=False, counters=False, kmeans_flag=False, backend=backend,
        )  # fmt: skip
        self.dim, self.codebook_size, self.frozen_codebook_dim = dim, codebook_size, fdim
        self.channel_first, self.rotation_trick = channel_first, bool(rotation_trick)
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.commitment_weight = float(commitment_weight)
        self.register_state_dict_post_hook(_to_vqp_keys)
        self.register_load_state_dict_pre_hook(_from_vqp_keys)

    # --- vqp's accessors ---------------------------------------------------------------------

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def code_transform(self) -> nn.Module:
        """The learned map (vqp's ``code_transform``)."""
        return self.book.simvq_transform

    @property
    def frozen_codebook(self) -> torch.Tensor:
        """The frozen basis ``(codebook_size, frozen_codebook_dim)``."""
        return self.book.simvq_basis

    @property
    def codebook(self) -> torch.Tensor:
        """The codes ``(codebook_size, dim)``, differentiable in the map."""
        return self.book.codes()[0]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 ``indices`` ``(B, ...)`` -> codes ``(B, ..., dim)`` (``(B, dim, ...)`` with
        ``channel_first``): the map applied to the gathered basis rows, as vqp.

        Args:
            indices: int64 ``(B, ...)`` in ``[0, codebook_size)``, as ``forward`` returns them.
        """
        codes = self.code_transform(self.frozen_codebook[indices])
        return codes.movedim(-1, 1) if self.channel_first else codes

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor):
        """See the class docstring.

        Args:
            x: float tensor ``(B, ..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x)}")
        if self.channel_first:
            if x.ndim < 2:
                raise ValueError(f"x must be (B, dim, ...) with channel_first, got {x.shape}")
            x = x.movedim(1, -1)
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} channels (dim), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        codes = self.codebook.to(x.dtype)
        q, idx, loss, _ = quantize_rows(
            x.reshape(-1, self.dim), codes, beta=self.input_to_quantize_commit_loss_weight,
            backend=resolve_backend(self.book.backend, x.device), codebook_weight=1.0,
            rotation_trick=self.rotation_trick,
        )  # fmt: skip
        q = q.reshape(*lead, self.dim)
        idx = idx.reshape(lead)
        if self.channel_first:
            q = q.movedim(-1, 1)
        return q, idx, (loss * self.commitment_weight).to(x.dtype)


class ResidualSimVQ(nn.Module):
    """vqp's ``ResidualSimVQ(*, dim, num_quantizers, codebook_size, heads=1,
    quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
    channel_first=False, rotation_trick=True, **sim_vq_kwargs)``: a stack of :class:`SimVQ` on
    the residual.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized like x, indices (B, ..., Q), losses (Q,))`` (indices -1 and loss 0 at dropped
    depths) and, with ``return_all_codes``, the codes ``(Q, B, ..., dim)``.

    Args:
        dim: channels of the input and of every depth's codes (no projection).
        num_quantizers: depths Q, a positive int.
        codebook_size: codes per depth, a positive int.
        heads: must be 1 (ValueError otherwise), as vqp.
        quantize_dropout: in training, run only the first ``k`` depths, ``k`` drawn per forward
            (the rest: index -1, loss 0); off for one quantizer.
        quantize_dropout_cutoff_index: the last kept depth is drawn from
            ``[cutoff, num_quantizers)``; an int >= 0 (Q or more: ValueError at the first
            draw, as vqp's draw fails there).
        quantize_dropout_multiple_of: the number of kept depths is rounded up to a multiple of
            this (at most ``num_quantizers``); a positive int.
        channel_first: ``x`` and ``quantized`` are ``(B, dim, ...)``, the codes
            ``(Q, B, dim, ...)``; passed to every depth.
        rotation_trick: every depth's gradient to its input through the rotation trick; False:
            straight-through.
        **sim_vq_kwargs: :class:`SimVQ`'s other arguments, the same for every depth (each draws
            its own basis; a given ``codebook_transform`` module is shared by all, as vqp).
    """

    def __init__(
        self, *, dim, num_quantizers, codebook_size, heads=1, quantize_dropout=False,
        quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, channel_first=False,
        rotation_trick=True, **sim_vq_kwargs,
    ):  # fmt: skip
        super().__init__()
        if heads != 1:
            raise ValueError(f"heads must be 1 (residual SimVQ has no heads, as vqp), got {heads}")
        num_quantizers = check_int("num_quantizers", num_quantizers, 1)
        self.quantize_dropout_cutoff_index = check_int(
            "quantize_dropout_cutoff_index", quantize_dropout_cutoff_index, 0
        )
        self.quantize_dropout_multiple_of = check_int(
            "quantize_dropout_multiple_of", quantize_dropout_multiple_of, 1
        )
        self.channel_first, self.num_quantizers = channel_first, num_quantizers
        self.layers = nn.ModuleList(
            SimVQ(
                dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick,
                channel_first=channel_first, **sim_vq_kwargs,
            ) for _ in range(num_quantizers)
        )  # fmt: skip
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.layers[0].codebook_dim

    @property
    def codebooks(self) -> torch.Tensor:
        """``(Q, codebook_size, dim)``."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(Q, B, ..., dim)`` (``(Q, B, dim, ...)`` with ``channel_first``) for indices
        ``(B, ..., q)``: -1 and missing depths give 0 (fewer depths need quantize dropout).

        Args:
            indices: int64 ``(B, ..., q)``, ``q <= num_quantizers`` (-1: no code); ``q`` below
                ``num_quantizers`` needs ``quantize_dropout`` (ValueError otherwise).
        """
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("fewer indices than quantizers needs quantize_dropout (as vqp)")
            indices = torch.nn.functional.pad(indices, (0, self.num_quantizers - q), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        codes = torch.stack([
            layer.codebook[indices[..., i]] for i, layer in enumerate(self.layers)
        ])  # fmt: skip
        codes = codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The summed codes of :meth:`get_codes_from_indices`.

        Args:
            indices: as :meth:`get_codes_from_indices`.
        """
        return self.get_codes_from_indices(indices).sum(0)

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        """See the class docstring.

        Args:
            x: float tensor ``(B, ..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
            return_all_codes: also return :meth:`get_codes_from_indices` of the indices.
            rand_quantize_dropout_fixed_seed: under quantize dropout: an int seeds vqp's draw
                (``random.Random(seed)``); None: one draw of torch's global generator
                (all-reduced across ranks), as vqp.
        """
        active = self.num_quantizers
        if self.training and self.quantize_dropout:
            seed = rand_quantize_dropout_fixed_seed
            seed = _maybe_sync_seed(x.device) if seed is None else seed
            active = vqp_num_active(
                self.num_quantizers, self.quantize_dropout_cutoff_index,
                self.quantize_dropout_multiple_of, seed,
            )  # fmt: skip
        out, residual, indices, losses = 0.0, x, [], []
        for layer in self.layers[:active]:
            q, idx, loss = layer(residual)
            residual = residual - q.detach()
            out = out + q
            indices.append(idx)
            losses.append(loss)
        if active < self.num_quantizers:
            null_idx = torch.full_like(indices[0], -1)
            null_loss = torch.zeros((), device=x.device, dtype=x.dtype)
            indices += [null_idx] * (self.num_quantizers - active)
            losses += [null_loss] * (self.num_quantizers - active)
        all_indices, all_losses = torch.stack(indices, -1), torch.stack(losses, -1)
        if not return_all_codes:
            return out, all_indices, all_losses
        return out, all_indices, all_losses, self.get_codes_from_indices(all_indices)


def _to_vqp_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in list(state_dict):
        for ours, theirs in KEYS.items():
            if key.startswith(prefix + ours):
                state_dict[prefix + theirs + key[len(prefix + ours) :]] = state_dict.pop(key)


def _from_vqp_keys(module, state_dict, prefix, *args) -> None:
    for key in list(state_dict):
        for ours, theirs in KEYS.items():
            if key.startswith(prefix + theirs):
                state_dict[prefix + ours + key[len(prefix + theirs) :]] = state_dict.pop(key)
