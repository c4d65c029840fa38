"""The edge trainer interface: one optimisation step of FedGKT's edge objective on one batch.

Backprop and the forward-gradient methods implement :class:`EdgeTrainer`; the edge client owns the
loop, data and soft labels, and calls ``train_step``. Register implementations with
``@register_trainer("name")`` so configs can select them by ``edge.trainer``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, TYPE_CHECKING

import torch
import torch.nn as nn

from edgefl_core.config import ConfigError, build_dataclass

if TYPE_CHECKING:  # the schema imports this registry to validate edge.trainer; only types flow back
    from edge_sdk.config import EdgeConfig


@dataclass
class StepResult:
    loss: float
    ce: float
    kd: float
    correct: int
    samples: int


class EdgeTrainer(ABC):
    name = "abstract"

    def __init__(self, model: nn.Module, cfg: EdgeConfig):
        self.model = model
        self.cfg = cfg

    @abstractmethod
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                   has_teacher: torch.Tensor | None) -> StepResult:
        """One update on a batch. ``teacher_logits``/``has_teacher`` are the server's soft labels for
        the batch's samples (rows without a teacher are masked out of the KD term)."""

    def finish_round(self) -> list[StepResult]:
        """Complete any batches still in flight (pipelined trainers) before the round's features are taken."""
        return []

    def state_dict(self) -> dict:
        """Optimizer state etc., so an agent can checkpoint and resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_TRAINERS: dict[str, Callable[[nn.Module, EdgeConfig], EdgeTrainer]] = {}


def register_trainer(name: str):
    def deco(cls):
        if name in _TRAINERS:
            raise ValueError(f"edge trainer {name!r} is already registered")
        _TRAINERS[name] = cls
        cls.name = name
        return cls
    return deco


def list_trainers() -> list[str]:
    return sorted(_TRAINERS)


def check_trainer_options(name: str, kwargs: dict) -> None:
    """Validate ``edge.trainer`` and ``edge.trainer_kwargs`` at config load, naming the bad key."""
    if name not in _TRAINERS:
        raise ConfigError(f"trainer: unknown trainer {name!r}; known: {', '.join(list_trainers())}")
    options_cls = getattr(_TRAINERS[name], "options_cls", None)
    if options_cls is None:
        if kwargs:
            raise ConfigError(f"trainer_kwargs: trainer {name!r} takes no options, got {', '.join(map(str, kwargs))}")
        return
    try:
        build_dataclass(options_cls, kwargs, "trainer_kwargs")
    except ConfigError as e:  # keep the message's own key path readable once the caller prefixes "edge."
        raise ConfigError(f"trainer_kwargs: {e} (trainer {name!r})") from None


def create_trainer(name: str, model: nn.Module, cfg: EdgeConfig) -> EdgeTrainer:
    if name not in _TRAINERS:
        raise ConfigError(f"edge.trainer: unknown trainer {name!r}; known: {', '.join(list_trainers())}")
    return _TRAINERS[name](model, cfg)
