"""AsyncFGD: forward-gradient training as a pipeline of K modules with module-wise descending staleness.

Module k's update is K-1-k steps stale; stale steps are damped by ``alpha_bias`` during warm-up. The
forward-mode machinery is shared with :mod:`edge_sdk.trainers.forward_grad`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from edge_sdk.trainers.base import StepResult, register_trainer
from edge_sdk.trainers.forward_grad import (ForwardModeTrainer, Tangents, gaussian_like, loss_and_derivative,
                                            make_generator, module_forward, step_result)
from edgefl_core.config import ConfigError, require



@dataclass
class AsyncFGDOptions:
    modules: int = 3              # K pipeline modules (contiguous groups of the model's chain)
    alpha_bias: float = 0.5       # warm-up damping of stale updates: step_k *= alpha^(staleness_k)
    warmup_steps: int = 200       # alpha ramps linearly from alpha_bias to 1 over this many updates
    parallel: bool = False        # run the K stages of a tick on K threads
    seed: int | None = None

    def check(self) -> None:
        require(self.modules >= 1, "modules", f"must be >= 1, got {self.modules}")
        require(0.0 < self.alpha_bias <= 1.0, "alpha_bias", f"must be in (0, 1], got {self.alpha_bias}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class _InFlight:
    """A batch travelling down the pipeline: its activation (primal and tangent) at the next module."""

    h: torch.Tensor
    h_tangent: torch.Tensor | None
    labels: torch.Tensor
    teacher: torch.Tensor | None
    has_teacher: torch.Tensor | None
    tangents: list[Tangents] = field(default_factory=list)  # one per module it has passed
    versions: list[int] = field(default_factory=list)       # each module's weight version it saw


def split_chain(chain: list[nn.Module], modules: int, trainer: str = "async_fgd") -> list[nn.Sequential]:
    """K contiguous groups of the chain, as even in length as possible."""
    if modules > len(chain):
        raise ConfigError(f"edge.trainer_kwargs.modules={modules} for {trainer}: larger than the model's "
                          f"{len(chain)} pipeline units")
    bounds = np.linspace(0, len(chain), modules + 1).round().astype(int)
    return [nn.Sequential(*chain[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@register_trainer("async_fgd")
class AsyncFGDTrainer(ForwardModeTrainer):
    """K modules form a pipeline: at every step each module advances a different batch by one module.

    A batch entering module 0 at step t reaches the loss at step t+K-1; the scalar ∇L·v then updates
    every module with its own tangent. Updates from the K-1 batches ahead of it have landed in
    between, so module k's update is K-1-k steps stale (staleness descends along the pipeline:
    AsyncFGD's Algorithm 1; with ``edge.optimizer=adam``, Algorithm 2). ``train_step`` returns the
    batch that finished (``samples=0`` while the pipeline fills); ``finish_round`` drains it.
    ``staleness_log`` records (batch, module, staleness) for every update.
    """

    options_cls = AsyncFGDOptions

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.modules = split_chain(self.chain, self.opts.modules, self.name)
        self.generator = make_generator(self.opts.seed)
        self.slots: list[_InFlight | None] = [None] * len(self.modules)  # slots[k]: input waiting for module k
        self.versions = [0] * len(self.modules)  # updates applied to each module so far
        self.updates = 0
        self.staleness_log: list[tuple[int, int, int]] = []
        self._batches = 0
        self._pool = ThreadPoolExecutor(len(self.modules)) if self.opts.parallel else None

    def alpha(self) -> float:
        if self.opts.warmup_steps == 0:
            return 1.0
        ramp = min(1.0, self.updates / self.opts.warmup_steps)
        return self.opts.alpha_bias + (1.0 - self.opts.alpha_bias) * ramp

    def train_step(self, images, labels, teacher_logits, has_teacher) -> StepResult:
        self.model.train()
        self.slots[0] = _InFlight(images, None, labels, teacher_logits, has_teacher)
        return self._tick()

    def finish_round(self) -> list[StepResult]:
        results = []
        while any(s is not None for s in self.slots):
            results.append(self._tick())
        return results

    def _stage(self, k: int, item: _InFlight, tangents: Tangents):
        with torch.no_grad():
            x = fwAD.make_dual(item.h, item.h_tangent) if item.h_tangent is not None else item.h
            out = module_forward(self.modules[k], x, tangents)
            if k < len(self.modules) - 1:
                primal, tangent = fwAD.unpack_dual(out)
                return primal.clone(), None if tangent is None else tangent.clone()
            return loss_and_derivative(out, item.labels, item.teacher, item.has_teacher, self.cfg)

    def _tick(self) -> StepResult:
        work = [(k, item) for k, item in enumerate(self.slots) if item is not None]
        for k, item in work:  # tangents drawn here, in order, so runs are reproducible with threads
            item.tangents.append(gaussian_like(dict(self.modules[k].named_parameters()), self.generator))
            item.versions.append(self.versions[k])
        with fwAD.dual_level():
            if self._pool is not None and len(work) > 1:
                outs = list(self._pool.map(lambda kw: self._stage(kw[0], kw[1], kw[1].tangents[-1]), work))
            else:
                outs = [self._stage(k, item, item.tangents[-1]) for k, item in work]
        last = len(self.modules) - 1
        finished = None
        for (k, item), out in zip(work, outs):
            if k == last:
                finished = (item, out)
            else:
                item.h, item.h_tangent = out
        self.slots = [None] + self.slots[:-1]
        if finished is None:
            return StepResult(0.0, 0.0, 0.0, 0, 0)
        item, (loss, ce, kd, logits, d) = finished
        self._update(item, d)
        return step_result(loss, ce, kd, logits, item.labels)

    def _update(self, item: _InFlight, d: float) -> None:
        alpha = self.alpha()
        self.optimizer.zero_grad(set_to_none=True)
        for k, module in enumerate(self.modules):
            staleness = self.versions[k] - item.versions[k]
            self.staleness_log.append((self._batches, k, staleness))
            scale = d * alpha ** staleness
            for name, p in module.named_parameters():
                p.grad = item.tangents[k][name] * scale
            self.versions[k] += 1
        self.optimizer.step()
        self.updates += 1
        self._batches += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))
