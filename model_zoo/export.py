"""ONNX export of the edge extractor and of the composed inference model, verified with onnxruntime.

* extractor: image -> features (what a device runs to take part in FedGKT inference);
* composed:  image -> extractor -> server model -> logits (the deployed FedGKT classifier).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


class FeatureExtractor(nn.Module):
    """The edge model up to the FedGKT seam (``forward_features``)."""

    def __init__(self, edge_model: nn.Module):
        super().__init__()
        self.edge = edge_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.edge.forward_features(images)


class ComposedClassifier(nn.Module):
    """Edge extractor followed by the server model: the model FedGKT serves at inference."""

    def __init__(self, edge_model: nn.Module, server_model: nn.Module):
        super().__init__()
        self.edge = edge_model
        self.server = server_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.server(self.edge.forward_features(images))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, input_name: str = "images",
                output_name: str = "output", opset: int = 18) -> Path:
    """Export ``model`` (in eval mode) with a dynamic batch dimension."""
    path = Path(path)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example.contiguous(),), str(path), input_names=[input_name], output_names=[output_name],
                      dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    return path


def verify_onnx(model: nn.Module, path: str | Path, example: torch.Tensor) -> float:
    """Max absolute difference between torch and onnxruntime outputs on ``example``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model.eval()(example.contiguous()).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: example.contiguous().numpy()})
    if got.shape != expected.shape:
        raise AssertionError(f"onnxruntime output shape {got.shape} != torch {expected.shape}")
    return float(np.abs(got - expected).max())
