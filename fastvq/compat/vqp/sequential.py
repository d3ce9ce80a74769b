"""vqp's special ``Sequential`` (``vector_quantize_pytorch.utils.Sequential``): modules run in
order, exactly one of them a quantizer, whose extra outputs (indices, losses) are passed
through."""

from __future__ import annotations

from torch import nn

from .fsq import FSQ, GroupedResidualFSQ, ResidualFSQ
from .lfq import LFQ
from .residual import GroupedResidualVQ, ResidualVQ
from .sim_vq import ResidualSimVQ, SimVQ
from .vq import VectorQuantize

__all__ = ["QUANTIZE_KLASSES", "Sequential"]

QUANTIZE_KLASSES = (
    VectorQuantize, ResidualVQ, GroupedResidualVQ, FSQ, LFQ, SimVQ, ResidualSimVQ, ResidualFSQ,
    GroupedResidualFSQ,
)  # fmt: skip
# vqp's own quantizers count too (a model may mix the two libraries); matched by name, so
# vqp need not be installed
VQP_NAMES = frozenset((
    "VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "RandomProjectionQuantizer", "FSQ",
    "LFQ", "SimVQ", "ResidualSimVQ", "ResidualLFQ", "GroupedResidualLFQ", "ResidualFSQ",
    "GroupedResidualFSQ", "FSP", "LatentQuantize", "HierarchicalVQ",
))  # fmt: skip


def is_quantizer(module: nn.Module) -> bool:
    """Whether ``module`` is one of this front end's quantizers or one of vqp's."""
    if isinstance(module, QUANTIZE_KLASSES):
        return True
    cls = type(module)
    return cls.__module__.startswith("vector_quantize_pytorch.") and cls.__name__ in VQP_NAMES


class Sequential(nn.Module):
    """vqp's ``Sequential(*fns)``: ``forward(x, **kwargs)`` runs ``fns`` in order; the one
    quantizer gets ``kwargs`` and its first output goes on, and the result is ``(x, *rest)``
    with ``rest`` the quantizer's other outputs (e.g. ``(out, indices, loss)``).

    Args:
        *fns: the modules, run in order: each an ``nn.Module``, exactly one of them a quantizer
            (this front end's or vqp's).

    Raises:
        TypeError: an entry of ``fns`` is not an ``nn.Module``.
        ValueError: ``fns`` does not hold exactly one quantizer (vqp: an assertion).
    """

    def __init__(self, *fns: nn.Module):
        super().__init__()
        for i, fn in enumerate(fns):
            if not isinstance(fn, nn.Module):
                raise TypeError(f"fns[{i}] must be an nn.Module, got {type(fn)}")
        count = sum(is_quantizer(fn) for fn in fns)
        if count != 1:
            raise ValueError(
                f"this special Sequential must contain exactly one quantizer (fns), got {count}"
            )
        self.fns = nn.ModuleList(fns)

    def forward(self, x, **kwargs):
        """See the class docstring.

        Args:
            x: the first module's input; each module's output (the quantizer's first) feeds
                the next.
            **kwargs: passed to the quantizer only.
        """
        rest = ()
        for fn in self.fns:
            if not is_quantizer(fn):
                x = fn(x)
                continue
            x, *rest = fn(x, **kwargs)
        return (x, *rest)
