"""``ResidualVQ``: a stack of :class:`~fastvq.VectorQuantizer` layers, each quantizing the residual.

    r_0 = project_in(x);  (q_i, idx_i) = VQ_i(r_i);  r_{i+1} = r_i - sg(q_i)
    quantized = project_out(sum_i q_i)   (forward value the sum of codes, gradient straight to x)
    loss = sum_i loss_i                  (each layer's commitment trains the encoder through r_i)

Every layer is the fused-op layer, so no N x K tensor exists at any depth; each layer keeps its
own EMA, k-means init (on its first residual batch), dead-code restart and DDP synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import QuantizeOutput, QuantizeOutputWithStats, VectorQuantizer, check_input


class ResidualVQ(nn.Module):
    """Residual vector quantization (SoundStream / EnCodec style).

    Args:
        dim: channels of the input.
        codebook_size: K of every layer.
        num_quantizers: number of layers Q.
        codebook_dim: dimension of the codes, with one linear projection in and out shared by
            all layers when it differs from ``dim``.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        **layer_kwargs: passed to every :class:`VectorQuantizer` (``ema``, ``beta``,
            ``kmeans_init``, ``dead_code_steps``, ``cosine``, ``backend``, ...). ``seed`` is
            offset per layer so that layers restart codes independently.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        *,
        codebook_dim: int | None = None,
        channel_first: bool = False,
        **layer_kwargs,
    ):
        super().__init__()
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int):
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        if layer_kwargs.get("heads", 1) != 1:
            raise ValueError("ResidualVQ does not support heads > 1")
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, num_quantizers
        self.channel_first = channel_first
        inner = codebook_dim or dim
        self.codebook_dim = inner
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        seed = layer_kwargs.pop("seed", 0)
        self.layers = nn.ModuleList(
            VectorQuantizer(inner, codebook_size, seed=seed + i, **layer_kwargs)
            for i in range(num_quantizers)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False
    ):
        """Quantize ``x`` with every layer.

        Returns:
            ``QuantizeOutput(quantized, indices, loss)`` with ``indices`` of shape
            ``x.shape without the channel dim + (num_quantizers,)`` and ``loss`` the sum of the
            layers' losses. With ``return_stats``: a fourth field, the list of each layer's
            :class:`~fastvq.CodebookStats`.
        """
        check_input(x, self.dim, self.channel_first)
        if self.channel_first:
            x = x.movedim(1, -1)
        z = self.project_in(x)
        residual = z
        total = None
        indices, losses, stats = [], [], []
        for layer in self.layers:
            out = layer(residual, mask=mask, return_stats=True)
            q = out.quantized.detach()
            total = q if total is None else total + q
            residual = residual - q
            indices.append(out.indices)
            losses.append(out.loss)
            stats.append(out.stats)
        quantized = self.project_out(total + (z - z.detach()))  # value: sum of codes; grad to z
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        indices = torch.stack(indices, dim=-1)
        loss = torch.stack(losses).sum()
        if return_stats:
            return QuantizeOutputWithStats(quantized, indices, loss, stats)
        return QuantizeOutput(quantized, indices, loss)

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode ``(..., num_quantizers)`` indices to the layer's output (eval: bit-identical)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() < 1 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(
                f"indices must have a trailing dim of size num_quantizers={self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        total = None
        for i, layer in enumerate(self.layers):
            q = layer.codes_from_indices(indices[..., i], check=check)
            total = q if total is None else total + q
        out = self.project_out(total)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return out
