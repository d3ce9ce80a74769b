"""vqp's tensor layouts for :class:`.vq.VectorQuantize`: its input layouts (channel-last tokens,
channel-first sequences, 2-D and 3-D feature maps, one token) to ``(B, N, dim)`` tokens and back,
and its heads to the codebooks' rows ``(G, M, d)`` and back (vqp's row order)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """``heads`` of ``codebook_dim`` each, ``separate`` codebooks per head or one shared;
    ``channel_last`` tokens unless ``fmap`` (``accept_image_fmap`` / ``accept_3d_fmap``)."""

    heads: int
    codebook_dim: int
    separate: bool
    channel_last: bool
    fmap: bool

    @property
    def channels_first(self) -> bool:
        return not self.channel_last or self.fmap

    def to_tokens(self, x: torch.Tensor):
        """``x`` -> ``(B, N, dim)`` and the function restoring a ``(B, N, ...)`` tensor to the
        input layout (``channel``: the tensor's last dim is the channel, moved to dim 1). A
        ``(B, dim)`` input is one token."""
        if x.ndim == 2:
            return x[:, None], lambda t, channel: t[:, 0]
        if self.fmap:
            spatial = x.shape[2:]
            return (
                x.flatten(2).transpose(1, 2),
                lambda t, channel: (
                    t.movedim(-1, 1).unflatten(2, spatial) if channel else t.unflatten(1, spatial)
                ),
            )
        if not self.channel_last:
            return x.transpose(1, 2), lambda t, channel: t.movedim(-1, 1) if channel else t
        return x, lambda t, channel: t

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, N, heads * d)`` -> vqp's ``(G, M, d)`` rows: separate codebooks ``(heads, B N,
        d)``, one shared codebook ``(1, B heads N, d)`` (vqp's row order)."""
        b, n = z.shape[:2]
        zh = z.reshape(b, n, self.heads, self.codebook_dim)
        if self.separate:
            return zh.permute(2, 0, 1, 3).reshape(self.heads, b * n, self.codebook_dim)
        return zh.permute(0, 2, 1, 3).reshape(1, b * self.heads * n, self.codebook_dim)

    def merge_heads(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`split_heads` for ``(G, M, *rest)`` -> ``(B, N, heads, *rest)``."""
        rest = t.shape[2:]
        if self.separate:
            return t.reshape(self.heads, b, n, *rest).movedim(0, 2)
        return t.reshape(b, self.heads, n, *rest).movedim(1, 2)

    def merge(self, q: torch.Tensor, idx: torch.Tensor, b: int, n: int):
        """The rows' codes ``(G, M, [k,] d)`` and indices ``(G, M[, k])`` -> the tokens' ``(B, N,
        [k,] heads * d)`` and ``(B, N[, heads][, k])`` (``topk``'s ``k`` needs one head)."""
        q, idx = self.merge_heads(q, b, n), self.merge_heads(idx, b, n)
        if self.heads > 1:
            return q.flatten(2), idx
        return q[:, :, 0], idx[:, :, 0]

    def row_mask(self, mask: torch.Tensor | None, g: int) -> torch.Tensor | None:
        """vqp's ``repeat(mask, 'b n -> c (b h n)')``: the token mask for every row."""
        if mask is None:
            return None
        b, n = mask.shape
        h = 1 if self.separate else self.heads
        return mask[:, None, :].expand(b, h, n).reshape(1, -1).expand(g, -1)

    def index_rows(self, indices: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Indices in the layer's layout (``(B, N)``, ``(B, N, heads)``, a feature map's
        ``(B, H, W[, heads])`` or vqp's flattened ``(B, H W)``) -> the rows' ``(G, M)``."""
        if indices.numel() != b * n * self.heads:
            raise ValueError(
                f"indices must hold {b} x {n} x {self.heads} (batch x tokens x heads) entries, "
                f"got shape {tuple(indices.shape)}"
            )
        idx = indices.reshape(b, n, self.heads).long()
        if self.separate:
            return idx.permute(2, 0, 1).reshape(self.heads, -1)
        return idx.permute(0, 2, 1).reshape(1, -1)
