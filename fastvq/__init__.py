"""fastvq: fast, memory-lean vector quantization for PyTorch.

``import fastvq`` never imports Triton: the kernels load on first use, so the package works
(with the torch backend) where Triton is absent.
"""

from .codebook_losses import ce_commitment_loss, diversity_loss, orthogonal_loss
from .fsq import FSQ
from .functional import VQOutput, vector_quantize
from .ibq import IBQ
from .layer import CodebookStats, QuantizeOutput, UsageMeter, VectorQuantizer, codebook_usage
from .lfq import LFQ
from .ops import code_counts, scatter_rows, search, triton_available
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .sampling import sample_codes, topk_codes
from .soft_assignment import SoftAssignment, soft_assign

__version__ = "0.1.0"

__all__ = [
    "CodebookStats",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "IBQ",
    "LFQ",
    "QuantizeOutput",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVQ",
    "UsageMeter",
    "VectorQuantizer",
    "codebook_usage",
    "VQOutput",
    "code_counts",
    "scatter_rows",
    "search",
    "triton_available",
    "vector_quantize",
    "sample_codes",
    "SoftAssignment",
    "soft_assign",
    "topk_codes",
    "ce_commitment_loss",
    "diversity_loss",
    "orthogonal_loss",
]
