"""The modules docs/export.md wraps a VQ-VAE's methods in for export, shared by tests/test_export.py
and tests/test_export_onnx.py, and the dynamic batch dimension both export with."""

from __future__ import annotations

import torch

BATCH = torch.export.Dim("batch", min=1, max=4096)


class Encode(torch.nn.Module):
    """``model.encode(x)``'s indices, as a module torch.export can take (docs/export.md)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encode(x)[1]


class DecodeIndices(torch.nn.Module):
    """``model.decode_indices(indices)`` as a module (docs/export.md)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, indices):
        return self.model.decode_indices(indices)
