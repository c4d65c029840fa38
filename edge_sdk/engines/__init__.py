"""Edge engines by name (``engine`` in an agent's config). Each is imported only when chosen: choosing
``onnxruntime`` never imports torch. See :mod:`edge_sdk.engine`."""
from __future__ import annotations

from edge_sdk.engine import ENGINES, EdgeEngine

__all__ = ["ENGINES", "EdgeEngine"]
