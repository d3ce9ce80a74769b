"""taming-transformers' ``VectorQuantizer2`` on fastvq's fused op (no N x K tensor anywhere).

The one-line switch, wherever taming's quantizer is imported (its ``taming/models/vqgan.py``
included)::

    from taming.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer   # before
    from fastvq.compat.taming import VectorQuantizer2 as VectorQuantizer            # after

or, for a model already built or loaded: ``fastvq.compat.taming.swap_quantizer(model)``.

What stays the same (tested against a reference of taming's ``VectorQuantizer2`` in
``tests/test_compat_taming.py``):

* the constructor ``(n_e, e_dim, beta, remap=None, unknown_index="random",
  sane_index_shape=False, legacy=True)`` and the attributes ``n_e``, ``e_dim``, ``beta``,
  ``legacy``, ``sane_index_shape``, ``remap``, ``re_embed``;
* the codebook is ``self.embedding`` (an ``nn.Embedding(n_e, e_dim)`` with taming's
  ``uniform(-1/n_e, 1/n_e)`` init), so ``state_dict`` holds ``embedding.weight`` only and a
  taming checkpoint loads with ``load_state_dict(..., strict=True)``;
* ``forward(z)`` on ``(B, e_dim, H, W)`` returns ``(z_q, loss, (None, None, indices))``:
  ``z_q`` ``(B, e_dim, H, W)`` with the straight-through gradient, ``indices`` int64 ``(B*H*W,)``
  (``(B, H, W)`` with ``sane_index_shape=True``), perplexity and one-hot encodings ``None`` as
  in taming's current ``VectorQuantizer2`` (no N x K one-hot is ever built);
* the loss and its ``legacy`` beta placement::

      legacy=True  (default):  mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
      legacy=False:            beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)

  i.e. with ``legacy=True`` beta weighs the codebook term and the commitment has weight 1;
  ``beta`` and ``legacy`` are read at every forward, so setting them afterwards works as in
  taming;
* ``get_codebook_entry(indices, shape)``.

Differences: ``remap`` (a ``.npy`` file of used codes) raises ``NotImplementedError``; the
forward value of ``z_q`` is exactly the code (theirs is ``z + (z_q - z)``, off by fp32
rounding); the loss is fp32 and is 0, not NaN, for an empty batch; bad input raises
``TypeError``/``ValueError`` naming the argument where taming asserts or fails inside torch.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_float, check_same_device, check_tensor
from ..functional import check_beta, quantize_rows
from ..ops import BACKENDS, resolve_backend


def _check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


class TamingStyleQuantizer(nn.Module):
    """The quantizer shared by taming's ``VectorQuantizer2`` and diffusers' ``VectorQuantizer``
    (diffusers copied taming's class). Use :class:`VectorQuantizer2` or
    ``fastvq.compat.diffusers.VectorQuantizer``, which add each library's argument names.

    Args:
        n_e: K, the number of codes.
        dim: the code dimension (taming's ``e_dim``, diffusers' ``vq_embed_dim``).
        beta: the loss weight whose placement ``legacy`` decides (see the module docstring).
        remap: must be None (``NotImplementedError`` otherwise).
        unknown_index: accepted and stored; used only by ``remap`` in taming and diffusers.
        sane_index_shape: return indices as ``(B, H, W)`` instead of ``(B*H*W,)``.
        legacy: True puts beta on the codebook term (their default), False on the commitment.
        backend: fastvq's backend, "auto", "torch" or "triton" (not an argument of theirs).
        dim_name: the name ``dim`` has in error messages.
    """

    def __init__(
        self, n_e: int, dim: int, beta: float, remap=None, unknown_index="random",
        sane_index_shape: bool = False, legacy: bool = True, *, backend: str = "auto",
        dim_name: str = "dim",
    ):  # fmt: skip
        super().__init__()
        if remap is not None:
            raise NotImplementedError(
                f"remap={remap!r} is not supported by fastvq.compat: its used-codes remapping is "
                "not implemented; build the quantizer with remap=None"
            )
        _check_positive_int("n_e", n_e)
        _check_positive_int(dim_name, dim)
        check_beta(beta)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.n_e, self.beta, self.legacy = n_e, beta, legacy
        self.backend, self._dim_name = backend, dim_name
        # The same module and the same init as theirs: a seeded construction draws the same codes
        # and the state_dict key is `embedding.weight`.
        self.embedding = nn.Embedding(n_e, dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = None
        self.unknown_index = unknown_index
        self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def extra_repr(self) -> str:
        return (
            f"n_e={self.n_e}, {self._dim_name}={self.embedding.embedding_dim}, beta={self.beta}, "
            f"legacy={self.legacy}, sane_index_shape={self.sane_index_shape}, "
            f"backend={self.backend!r}"
        )

    def _loss_weights(self) -> tuple[float, float]:
        """``(commitment weight, codebook-term weight)`` for fastvq's op from beta and legacy."""
        check_beta(self.beta)  # re-checked: beta may have been set after construction
        beta = float(self.beta)
        return (1.0, beta) if self.legacy else (beta, 1.0)

    def _quantize(self, z: torch.Tensor):
        """``(z_q (B, dim, H, W), loss fp32 0-dim, (None, None, indices))`` for ``z`` of shape
        ``(B, dim, H, W)``."""
        dim = self.embedding.embedding_dim
        check_tensor("z", z)
        check_float("z", z)
        if z.dim() != 4 or z.shape[1] != dim:
            raise ValueError(
                f"z must have shape (B, {self._dim_name}={dim}, H, W), got {tuple(z.shape)}"
            )
        weight = self.embedding.weight
        check_same_device("z", z, "embedding.weight", weight)
        b, _, h, w = z.shape
        commit, codebook_weight = self._loss_weights()
        q, idx, loss, _ = quantize_rows(
            z.permute(0, 2, 3, 1).reshape(b * h * w, dim), weight, beta=commit,
            backend=resolve_backend(self.backend, z.device), codebook_weight=codebook_weight,
        )  # fmt: skip
        z_q = q.view(b, h, w, dim).permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            idx = idx.view(b, h, w)
        # (perplexity, min_encodings) are None in theirs too: no N x K one-hot is built
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape) -> torch.Tensor:
        """The codes of ``indices``.

        Args:
            indices: int64, any shape (typically the flattened ``(B*H*W,)`` forward returns).
            shape: ``(B, H, W, dim)`` to lay the codes out as ``(B, dim, H, W)``, or None to
                return ``indices.shape + (dim,)``.
        """
        check_tensor("indices", indices)
        if shape is not None and len(shape) != 4:
            raise ValueError(f"shape must be (batch, height, width, channel), got {shape!r}")
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

    @classmethod
    def _from_quantizer(cls, old: nn.Module, dim_attr: str, backend: str):
        """A fastvq quantizer with ``old``'s configuration, weights, device, dtype, trainability
        and mode."""
        emb = getattr(old, "embedding", None)
        if not isinstance(emb, nn.Embedding):
            raise TypeError(
                f"quantize must hold its codebook in an nn.Embedding `embedding`, got "
                f"{type(old).__name__} without one"
            )
        new = cls(
            old.n_e, getattr(old, dim_attr), old.beta, remap=getattr(old, "remap", None),
            unknown_index=getattr(old, "unknown_index", "random"),
            sane_index_shape=getattr(old, "sane_index_shape", False),
            legacy=getattr(old, "legacy", True), backend=backend,
        )  # fmt: skip
        w = emb.weight
        new.to(device=w.device, dtype=w.dtype)
        new.load_state_dict(old.state_dict(), strict=True)
        new.embedding.weight.requires_grad_(w.requires_grad)
        return new.train(old.training)


def _swap(model: nn.Module, cls, dim_attr: str, backend: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    old = getattr(model, "quantize", None)
    if not isinstance(old, nn.Module):
        raise TypeError(f"model must have a `quantize` module, {type(model).__name__} has none")
    if not isinstance(old, cls):
        model.quantize = cls.from_quantizer(old, backend=backend)
    return model


class VectorQuantizer2(TamingStyleQuantizer):
    """taming-transformers' ``VectorQuantizer2`` (taming/modules/vqvae/quantize.py) on fastvq's
    fused op; see the module docstring for what is the same and what differs.

    Args:
        n_e: K, the number of codes.
        e_dim: the code dimension D (the channels of ``z``).
        beta: 0.25 in taming's configs; placed by ``legacy``.
        remap: must be None (``NotImplementedError`` otherwise).
        unknown_index: accepted; only ``remap`` uses it.
        sane_index_shape: indices ``(B, H, W)`` instead of ``(B*H*W,)``.
        legacy: True (default) puts beta on the codebook term, False on the commitment.
        backend: fastvq's backend ("auto": Triton for CUDA tensors, torch otherwise).
    """

    def __init__(
        self, n_e: int, e_dim: int, beta: float, remap=None, unknown_index="random",
        sane_index_shape: bool = False, legacy: bool = True, *, backend: str = "auto",
    ):  # fmt: skip
        super().__init__(
            n_e, e_dim, beta, remap, unknown_index, sane_index_shape, legacy, backend=backend,
            dim_name="e_dim",
        )  # fmt: skip
        self.e_dim = e_dim

    def forward(self, z: torch.Tensor, temp=None, rescale_logits=False, return_logits=False):
        """Quantize ``z`` of shape ``(B, e_dim, H, W)``.

        ``temp``, ``rescale_logits`` and ``return_logits`` exist, as in taming, only for interface
        compatibility with its Gumbel quantizer: anything but their defaults raises ValueError.

        Args:
            z: float32/16/bf16 ``(B, e_dim, H, W)``, on the codebook's device.
            temp: None or 1.0 (ignored); any other value raises ValueError.
            rescale_logits: must be False (True raises ValueError).
            return_logits: must be False (True raises ValueError).

        Returns:
            ``(z_q, loss, (None, None, indices))``: ``z_q`` ``(B, e_dim, H, W)`` (forward value
            the codes, gradient straight through to ``z``), ``loss`` fp32 0-dim, ``indices``
            int64 ``(B*H*W,)`` or ``(B, H, W)`` with ``sane_index_shape``.
        """
        if not (temp is None or temp == 1.0):
            raise ValueError(f"temp must be None or 1.0 (Gumbel interface only), got {temp!r}")
        if rescale_logits:
            raise ValueError("rescale_logits must be False (Gumbel interface only)")
        if return_logits:
            raise ValueError("return_logits must be False (Gumbel interface only)")
        return self._quantize(z)

    @classmethod
    def from_quantizer(cls, quantizer: nn.Module, *, backend: str = "auto") -> VectorQuantizer2:
        """This class built from taming's ``VectorQuantizer2`` ``quantizer``: same arguments,
        weights, device, dtype, ``requires_grad`` and train/eval mode."""
        return cls._from_quantizer(quantizer, "e_dim", backend)


def swap_quantizer(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace ``model.quantize`` (taming's ``VectorQuantizer2``, as taming's and latent
    diffusion's ``VQModel`` hold it) in place by :class:`VectorQuantizer2` with the same
    configuration and weights; returns ``model``. A model already swapped is left as it is.

    The one-line switch for a built model: ``fastvq.compat.taming.swap_quantizer(model)``.
    ``model.state_dict()`` keeps its keys, so taming checkpoints load strictly before or after.

    Args:
        model: an ``nn.Module`` whose ``quantize`` is taming's ``VectorQuantizer2`` (codebook in
            an ``nn.Embedding`` ``embedding``); TypeError without one.
        backend: fastvq's backend for the new quantizer, "auto", "torch" or "triton".
    """
    return _swap(model, VectorQuantizer2, "e_dim", backend)
