"""``IBQ``: index backpropagation quantization (Shi et al. 2024, arXiv 2412.02692; the SEED-Voken
tokenizers) on :func:`fastvq.soft_assign`: gradients reach every code, with no N x K matrix::

    logits   x = z C^T / temperature                                   (N, K), never stored
    index    argmax_k x_k                                              ties -> lowest k
    q        (onehot - sg(p) + p) C,  p = softmax(x)                   value C[index]
    loss     w_dq mean((q - z)^2) + w_c mean((sg(C[i]) - z)^2) + beta mean((C[i] - sg(z))^2)
             + w_e (w_s H_sample - w_b H_codebook)         entropies at entropy_temperature

SEED-Voken's ``IndexPropagationQuantize`` (src/IBQ/modules/vqvae/quantize.py) computes each of
these with N x K ``logits``/``soft_one_hot``/``hard_one_hot``; here ``p @ C`` and the entropies come
from the fused op (the codebook entropy over all K codes through its column sums). Every weight
is an argument; docs/ibq.md cites where each default comes from and lists the departures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from ._checks import is_int, is_real
from .codebook import Codebook
from .layer_config import check_indices, check_input, check_mask
from .outputs import quantize_output
from .soft_assignment import soft_assign

__all__ = ["IBQ", "IBQConfig", "IBQLossBreakdown", "ibq_entropy_terms", "ibq_loss",
           "ibq_quantize_rows"]  # fmt: skip


class IBQLossBreakdown(NamedTuple):
    """IBQ's unweighted loss terms (fp32 0-dim; zeros in eval):
    ``loss = double_quant_weight * double_quant + commitment_weight * commitment
    + codebook_weight * codebook + entropy_loss_weight * (sample_entropy_weight * sample_entropy
    - codebook_entropy_weight * codebook_entropy)``."""

    double_quant: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor
    sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor


WEIGHTS = ("double_quant_weight", "commitment_weight", "codebook_weight", "entropy_loss_weight",
           "sample_entropy_weight", "codebook_entropy_weight")  # fmt: skip


@dataclass
class IBQConfig:
    """Every option of :class:`IBQ`, checked (TypeError/ValueError naming the argument).

    Args:
        dim: D, the rows' channels (no projection).
        codebook_size: K >= 1, the number of codes.
        temperature: of the softmax whose gradient the codes get (SEED-Voken: 1).
        double_quant_weight: ``mean((q - z)^2)`` (SEED-Voken: 1).
        commitment_weight: ``mean((sg(C[i]) - z)^2)`` (SEED-Voken: 1).
        codebook_weight: ``mean((C[i] - sg(z))^2)``, SEED-Voken's ``beta`` (0.25).
        entropy_loss_weight: of the entropy term (SEED-Voken's 2^18 configuration: 0.05; 0 off).
        entropy_temperature: its own softmax temperature (SEED-Voken: 0.01).
        sample_entropy_weight: ``w_s``, weight of the mean per-row entropy inside the entropy
            term, SEED-Voken's ``sample_minimization_weight`` (1).
        codebook_entropy_weight: ``w_b``, weight of the entropy of the rows' mean distribution
            over the codes (subtracted: maximised), SEED-Voken's ``batch_maximization_weight`` (1).
        entropy_eps: the ``eps`` in SEED-Voken's ``log(avg_probs + eps)`` (1e-5).
        init_scale: the initial codes' standard deviation, N(0, init_scale^2) (SEED-Voken's
            ``nn.Embedding``: 1). In the demo's VQ-VAE smaller codes (0.1 at K = 2^14, 0.03
            at 2^16) kept the entropy term's softmax at ``entropy_temperature`` from
            saturating, so its gradient reached every code (docs/ibq.md, "Why it collapsed in
            the demo's VQ-VAE"); the argmax itself does not depend on the scale.
        channel_first: input laid out (B, dim, ...).
        backend: the op's backend (``"auto"``, ``"torch"``, ``"triton"``).
    """

    dim: int
    codebook_size: int
    temperature: float = 1.0
    double_quant_weight: float = 1.0
    commitment_weight: float = 1.0
    codebook_weight: float = 0.25
    entropy_loss_weight: float = 0.05
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0
    codebook_entropy_weight: float = 1.0
    entropy_eps: float = 1e-5
    init_scale: float = 1.0
    channel_first: bool = False
    backend: str = "auto"

    def __post_init__(self):
        for name in ("dim", "codebook_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in WEIGHTS:
            v = getattr(self, name)
            if not is_real(v):
                raise ValueError(f"{name} must be a finite float, got {v!r}")
            setattr(self, name, float(v))
        for name in ("temperature", "entropy_temperature", "entropy_eps", "init_scale"):
            v = getattr(self, name)
            if not is_real(v) or v <= 0:
                raise ValueError(f"{name} must be a positive float, got {v!r}")
            setattr(self, name, float(v))
        if not isinstance(self.channel_first, bool):
            raise TypeError(f"channel_first must be a bool, got {self.channel_first!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")


def ibq_quantize_rows(z, codes, temperature: float, backend: str = "auto"):
    """IBQ's estimator on rows ``z`` (N, D) and ``codes`` (K, D), one dtype (fp32 or fp64).

    Returns ``(q, index, hard)``: ``q`` (N, D) with value ``codes[index]`` and the gradient of
    ``(onehot - sg(p) + p) @ codes`` (to ``codes`` through the one-hot and through ``p``, never
    through ``p``'s own product with the codes); ``index`` int64 (N,); ``hard = codes[index]``.
    """
    out = soft_assign(z, codes, temperature=temperature, backend=backend,
                      column_sums=False, value_grad=False)  # fmt: skip
    hard = codes.index_select(0, out.index)
    soft = out.expected_code.to(hard.dtype)
    return hard + (soft - soft.detach()), out.index, hard


def ibq_entropy_terms(z, codes, keep, temperature: float, eps: float, backend: str = "auto"):
    """SEED-Voken's ``compute_entropy_loss`` of the logits ``z codes^T``, over the counted rows:
    ``(sample_entropy, codebook_entropy)``, the mean per-row entropy of ``softmax(x / T)`` and
    ``-sum_k pbar_k log(pbar_k + eps)`` of the mean distribution over all K codes."""
    out = soft_assign(
        z, codes, temperature=temperature, mask=keep, backend=backend, expected_code=False
    )
    m = z.shape[0] if keep is None else keep.sum()
    m = torch.as_tensor(m, dtype=out.lse.dtype, device=z.device).clamp(min=1)
    sample = out.entropy.sum() / m  # H(p) = lse - E_p[x], kept exact when p is one-hot; masked: 0
    avg = out.column_sums / m
    return sample, -(avg * torch.log(avg + eps)).sum()


def ibq_loss(z, codes, keep, q, hard, c: IBQConfig) -> tuple[torch.Tensor, IBQLossBreakdown]:
    """SEED-Voken's four terms over the counted rows (``keep``: None or bool (N,)), the three
    squared errors as means over their elements; ``q, hard`` from :func:`ibq_quantize_rows`."""
    zr, qr, hr = (z, q, hard) if keep is None else (z[keep], q[keep], hard[keep])
    zero = z.new_zeros(())
    mse = lambda a, b: (a - b).square().mean() if a.numel() else zero  # noqa: E731
    dq = mse(qr, zr)  # the "double quantization" term: its gradient goes through p too
    commit = mse(hr.detach(), zr)
    book = mse(hr, zr.detach())
    hs = hc = zero
    if c.entropy_loss_weight != 0:
        hs, hc = ibq_entropy_terms(z, codes, keep, c.entropy_temperature, c.entropy_eps,
                                   c.backend)  # fmt: skip
    entropy = c.sample_entropy_weight * hs - c.codebook_entropy_weight * hc
    loss = (c.double_quant_weight * dq + c.commitment_weight * commit + c.codebook_weight * book
            + c.entropy_loss_weight * entropy)  # fmt: skip
    return loss, IBQLossBreakdown(dq, commit, book, hs, hc)


class IBQ(nn.Module):
    """Index backpropagation quantization with a learned codebook (a :class:`~fastvq.codebook.
    Codebook` holding an ``nn.Parameter``), built on :func:`fastvq.soft_assign`.

    ``IBQ(dim, codebook_size, **options)`` (:class:`IBQConfig`); ``q(x, mask=None)`` returns
    ``(quantized, indices, loss)`` like every fastvq layer (``return_loss_breakdown=True`` adds
    an :class:`IBQLossBreakdown`). Codes start as N(0, init_scale^2): SEED-Voken's
    ``nn.Embedding`` N(0, 1) by default.
    The op runs in fp32 with autocast off; ``quantized`` takes x's dtype.

    Args:
        dim: D, the input's channels (no projection).
        codebook_size: K >= 1, the number of codes.
        **options: every other :class:`IBQConfig` option, by keyword (TypeError for an unknown
            name).
    """

    def __init__(self, dim: int, codebook_size: int, **options):
        super().__init__()
        known = {f.name for f in fields(IBQConfig)}
        for name in options:
            if name not in known:
                raise TypeError(f"IBQ got an unexpected keyword argument {name!r}")
        cfg = IBQConfig(dim, codebook_size, **options)
        self.config = cfg
        self.book = Codebook(1, codebook_size, dim, learning="grad", grouped=False,
                             init=torch.randn(codebook_size, dim) * cfg.init_scale, counters=False,
                             kmeans_flag=False)  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, codebook_size={c.codebook_size}, temperature={c.temperature}"

    def codes(self) -> torch.Tensor:
        """(K, D) the codes."""
        return self.book.codes()[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_loss_breakdown: bool = False):  # fmt: skip
        """Quantize ``x`` (``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``); ``mask``
        bool, x's shape without the channel dim (False rows output their code, pass no gradient
        and count in no loss). Loss in training only (a zero fp32 scalar in eval).

        Args:
            x: float32, float16 or bfloat16 ``(..., dim)``, or ``(B, dim, ...)`` with
                ``channel_first``.
            mask: None, or bool with ``x``'s shape without the channel dim; True = real row.
            return_loss_breakdown: also return the detached :class:`IBQLossBreakdown`
                (unweighted terms; zeros in eval).
        """
        c = self.config
        check_input(x, c.dim, c.channel_first)
        xr = x.movedim(1, -1) if c.channel_first else x
        lead = xr.shape[:-1]
        if mask is not None:
            check_mask(mask, lead)
        n = math.prod(lead)
        keep = None if mask is None else mask.reshape(n)
        with torch.autocast(x.device.type, enabled=False):
            z = xr.reshape(n, c.dim).to(torch.float32)
            if keep is not None:  # masked rows enter detached and finite
                z = torch.where(keep[:, None], z, z.detach().nan_to_num(0.0))
            codes = self.codes().to(torch.float32)
            q, idx, hard = ibq_quantize_rows(z, codes, c.temperature, c.backend)
            if keep is not None:
                q = torch.where(keep[:, None], q, hard.detach())
            zero = torch.zeros((), dtype=torch.float32, device=x.device)
            loss, parts = zero, IBQLossBreakdown(zero, zero, zero, zero, zero)
            if self.training:
                loss, parts = ibq_loss(z, codes, keep, q, hard, c)
        quantized = q.to(x.dtype).reshape(*lead, c.dim)
        quantized = quantized.movedim(-1, 1) if c.channel_first else quantized
        bd = IBQLossBreakdown(*(t.detach() for t in parts)) if return_loss_breakdown else None
        return quantize_output(quantized, idx.reshape(lead), loss, None, bd)

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """The codes (fp32) of int ``indices`` ``(...)``, as the eval forward outputs them
        (before the cast to x's dtype): ``(..., dim)``, or ``(B, dim, ...)`` with
        ``channel_first``, as every fastvq layer (a model decodes any family's index maps the
        same way). ``check``: ValueError on indices outside ``[0, codebook_size)`` (a host sync).

        Args:
            indices: int tensor of any shape ``(...)``, values in ``[0, codebook_size)``.
            check: raise ValueError on indices outside ``[0, codebook_size)`` (a host sync);
                False skips the check.
        """
        check_indices(indices, 1, self.config.codebook_size, check)
        q = self.codes().to(torch.float32)[indices.to(torch.int64)]
        return q.movedim(-1, 1) if self.config.channel_first else q
