"""Edge engines by name (``engine`` in an agent's config), shaped like the other registries: one module per
engine. Each is imported only when chosen (by module path, so choosing ``onnxruntime`` never imports torch:
an import-linter contract in pyproject.toml holds the agent to that). See :mod:`edge_sdk.engine`."""
from __future__ import annotations

import importlib

from edge_sdk.engine import ENGINES, EdgeEngine

_ENGINE_CLASSES = {"torch": "edge_sdk.engines.torch_engine:TorchEngine",
                   "onnxruntime": "edge_sdk.engines.onnx_engine:OnnxEngine"}
assert set(_ENGINE_CLASSES) == set(ENGINES)


def engine_class(name: str) -> type[EdgeEngine]:
    """The engine class of ``name``; raises ValueError for an unknown engine, ImportError when the engine's
    packages are not installed (torch needs the ``torch`` extra)."""
    if name not in _ENGINE_CLASSES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    module, _, cls = _ENGINE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "EdgeEngine", "engine_class"]
