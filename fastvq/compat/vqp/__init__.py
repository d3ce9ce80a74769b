"""A vector-quantize-pytorch 1.32.0 ("vqp") compatible front end on fastvq's layers.

``from fastvq.compat.vqp import VectorQuantize`` replaces ``from vector_quantize_pytorch import
VectorQuantize`` (likewise ``ResidualVQ`` and ``GroupedResidualVQ``). One module per vqp family:
:mod:`.vq` (``VectorQuantize``, its codebook under vqp's names) and :mod:`.residual`
(``ResidualVQ``, ``GroupedResidualVQ``). The codes and their learning are a
:class:`fastvq.codebook.Codebook` with vqp's policies (:mod:`fastvq.codebook.vqp_rules`); this
package maps names, defaults, arguments, return layouts and ``state_dict`` keys.
"""

from .residual import GroupedResidualVQ, ResidualVQ
from .vq import LossBreakdown, VectorQuantize, orthogonal_loss

__all__ = ["GroupedResidualVQ", "LossBreakdown", "ResidualVQ", "VectorQuantize", "orthogonal_loss"]
