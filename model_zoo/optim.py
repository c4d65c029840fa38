"""The optimizers both sides use (edge trainers and the server trainer), built from their configs."""
from __future__ import annotations

from typing import Iterable, Protocol

import torch


class OptimizerSettings(Protocol):
    optimizer: str        # "sgd" | "adam"
    lr: float
    momentum: float       # SGD only
    weight_decay: float


def make_optimizer(params: Iterable, cfg: OptimizerSettings, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or Adam with weight decay (``cfg.optimizer``). ``fused``: torch's
    fused kernel (one pass over all parameters, CPU and CUDA) instead of a loop over tensors; None: torch's
    default (the loop, on CPU)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: sgd, adam")
