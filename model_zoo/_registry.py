"""Model registry: ``create_model(name, **kwargs)`` over variant functions registered by name.

Each family file decorates its one-line variant functions with ``@register_model``; importing
``model_zoo`` imports every family so the registry is complete.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch.nn as nn

_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; a second model with the same name is a bug."""
    name = fn.__name__
    if name in _MODEL_FNS:
        raise ValueError(f"model {name!r} is already registered (by {_MODEL_FNS[name].__module__})")
    _MODEL_FNS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODEL_FNS)


def is_model(name: str) -> bool:
    return name in _MODEL_FNS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; unknown names fail with the list of known ones."""
    try:
        fn = _MODEL_FNS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return fn(**kwargs)


_SEEDED_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int):
    """Initialise models from ``seed`` without touching anyone else's draws: holds a process-wide lock and
    forks torch's CPU generator, so several agents and the runtime sharing one process (``--transport
    memory``) build exactly the weights they would build in processes of their own."""
    import torch
    with _SEEDED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
