"""diffusers' ``VectorQuantizer`` (the one ``diffusers.VQModel.quantize`` holds) on fastvq's
fused op (no N x K tensor anywhere). This module does not import diffusers.

The one-line switch for a built or loaded model (``VQModel.from_pretrained(...)`` included)::

    fastvq.compat.diffusers.swap_quantizer(vq_model)

It replaces ``vq_model.quantize`` in place by :class:`VectorQuantizer` with the same
configuration, weights, device, dtype and mode. The model's ``state_dict`` keys do not change
(``quantize.embedding.weight``), so diffusers checkpoints load into the swapped model with
``load_state_dict(..., strict=True)`` and ``save_pretrained`` writes what diffusers reads. For
code that builds the quantizer itself::

    from diffusers.models.autoencoders.vae import VectorQuantizer   # before
    from fastvq.compat.diffusers import VectorQuantizer             # after

Same constructor ``(n_e, vq_embed_dim, beta, remap=None, unknown_index="random",
sane_index_shape=False, legacy=True)``, same return value ``(z_q, loss, (None, None,
indices))`` (diffusers' perplexity and one-hot encodings are None), the same ``legacy`` beta
placement, ``get_codebook_entry(indices, shape)``; ``remap`` raises ``NotImplementedError``. The
behaviour and the differences are those of :mod:`fastvq.compat.taming` (diffusers copied taming's
``VectorQuantizer2``); one more: diffusers searches with ``torch.cdist``, whose matmul form can
pick another code than the exact nearest one in near-ties, where fastvq's fp32 search with
lowest-index ties is the reference. Tested against diffusers 0.42.1's ``VQModel`` in
``tests/test_compat_diffusers.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .taming import TamingStyleQuantizer, _swap


class VectorQuantizer(TamingStyleQuantizer):
    """diffusers' ``diffusers.models.autoencoders.vae.VectorQuantizer`` on fastvq's fused op.

    Args:
        n_e: K, the number of codes (``VQModel``'s ``num_vq_embeddings``).
        vq_embed_dim: the code dimension D (the channels of ``z``).
        beta: 0.25 in ``VQModel``; placed by ``legacy`` (see :mod:`fastvq.compat.taming`).
        remap: must be None (``NotImplementedError`` otherwise).
        unknown_index: accepted; only ``remap`` uses it.
        sane_index_shape: indices ``(B, H, W)`` instead of ``(B*H*W,)``.
        legacy: True (default, and what ``VQModel`` builds) puts beta on the codebook term,
            False on the commitment.
        backend: fastvq's backend ("auto": Triton for CUDA tensors, torch otherwise).
    """

    def __init__(
        self, n_e: int, vq_embed_dim: int, beta: float, remap=None,
        unknown_index: str = "random", sane_index_shape: bool = False, legacy: bool = True, *,
        backend: str = "auto",
    ):  # fmt: skip
        super().__init__(
            n_e, vq_embed_dim, beta, remap, unknown_index, sane_index_shape, legacy,
            backend=backend, dim_name="vq_embed_dim",
        )  # fmt: skip
        self.vq_embed_dim = vq_embed_dim

    def forward(self, z: torch.Tensor):
        """Quantize ``z`` of shape ``(B, vq_embed_dim, H, W)``.

        Args:
            z: float32/16/bf16 ``(B, vq_embed_dim, H, W)``, on the codebook's device.

        Returns:
            ``(z_q, loss, (None, None, indices))``: ``z_q`` ``(B, vq_embed_dim, H, W)`` (forward
            value the codes, gradient straight through to ``z``), ``loss`` fp32 0-dim (what
            ``VQModel`` returns as ``commit_loss``), ``indices`` int64 ``(B*H*W,)`` or
            ``(B, H, W)`` with ``sane_index_shape``.
        """
        return self._quantize(z)

    @classmethod
    def from_quantizer(cls, quantizer: nn.Module, *, backend: str = "auto") -> VectorQuantizer:
        """This class built from diffusers' ``VectorQuantizer`` ``quantizer``: same arguments,
        weights, device, dtype, ``requires_grad`` and train/eval mode."""
        return cls._from_quantizer(quantizer, "vq_embed_dim", backend)


def swap_quantizer(vq_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace ``vq_model.quantize`` (diffusers' ``VectorQuantizer``) in place by
    :class:`VectorQuantizer`, with the same configuration and weights; returns ``vq_model``.

    Args:
        vq_model: a ``diffusers.VQModel`` (or any module whose ``quantize`` is diffusers'
            ``VectorQuantizer``). A model already swapped is left as it is.
        backend: fastvq's backend for the new quantizer.

    Example:
        >>> vq = diffusers.VQModel.from_pretrained(path)        # doctest: +SKIP
        >>> fastvq.compat.diffusers.swap_quantizer(vq)          # doctest: +SKIP
        >>> out = vq(images)   # out.sample, out.commit_loss   # doctest: +SKIP
    """
    return _swap(vq_model, VectorQuantizer, "vq_embed_dim", backend)
