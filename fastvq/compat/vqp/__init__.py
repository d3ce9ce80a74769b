"""A vector-quantize-pytorch 1.32.0 ("vqp") compatible front end on fastvq's layers.

``from fastvq.compat.vqp import VectorQuantize`` replaces ``from vector_quantize_pytorch import
VectorQuantize`` (likewise ``ResidualVQ``, ``GroupedResidualVQ``, ``FSQ``, ``ResidualFSQ``,
``GroupedResidualFSQ``, ``LFQ``, ``ResidualLFQ``, ``GroupedResidualLFQ``, ``SimVQ``,
``ResidualSimVQ`` and vqp's special ``Sequential``). One module per vqp family: :mod:`.vq`
(``VectorQuantize``, its codebook under vqp's names), :mod:`.residual` (``ResidualVQ``,
``GroupedResidualVQ``), :mod:`.fsq` (``FSQ``, ``ResidualFSQ``, ``GroupedResidualFSQ`` on
:class:`fastvq.FSQ` and :mod:`fastvq.stack`), :mod:`.lfq` (``LFQ``, ``ResidualLFQ``,
``GroupedResidualLFQ`` on :class:`fastvq.LFQ` and :mod:`fastvq.stack`), :mod:`.sim_vq`
(``SimVQ``, ``ResidualSimVQ`` on a SimVQ :class:`fastvq.codebook.Codebook`) and
:mod:`.sequential`. The VQ codes and their learning are a :class:`fastvq.codebook.Codebook` with
vqp's policies
(:mod:`fastvq.codebook.vqp_rules`); this package maps names, defaults, arguments, return layouts
and ``state_dict`` keys.
"""

# The vector-quantize-pytorch release this front end follows and is tested against (pyproject's
# ``bench`` extra installs it); later releases change results (1.34.1 fails 59 agreement tests).
MIRRORED_VERSION = "1.32.0"

from .fsq import FSQ, GroupedResidualFSQ, ResidualFSQ  # noqa: E402
from .lfq import LFQ, GroupedResidualLFQ, ResidualLFQ  # noqa: E402
from .residual import GroupedResidualVQ, ResidualVQ  # noqa: E402
from .sequential import Sequential  # noqa: E402
from .sim_vq import ResidualSimVQ, SimVQ  # noqa: E402
from .vq import LossBreakdown, VectorQuantize, orthogonal_loss  # noqa: E402

__all__ = [
    "FSQ", "GroupedResidualFSQ", "GroupedResidualLFQ", "GroupedResidualVQ", "LFQ",
    "LossBreakdown", "ResidualFSQ", "ResidualLFQ", "ResidualSimVQ", "ResidualVQ", "Sequential",
    "SimVQ", "VectorQuantize", "orthogonal_loss",
]  # fmt: skip
