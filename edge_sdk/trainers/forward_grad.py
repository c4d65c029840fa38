"""Forward-gradient edge trainers: no backward pass through the network, no stored activation graph.

A forward gradient is ``(∇L·v) v`` for a tangent ``v``: one forward-mode pass with dual numbers gives
the directional derivative ``∇L·v`` alongside the loss, keeping only the current layer's activations
(Baydin et al. 2022). Its variance grows with the perturbed dimension, so the methods here differ in
how they choose ``v``:

``fg_weight``       weight-perturbed FG with ``tangents`` Gaussian tangents, on a chosen parameter
                    subset; optionally the classifier takes its exact gradient (a local, one-layer
                    backward that needs only its own input).
``fg_local_guess``  FG with local-gradient guesses (Fournier et al. 2023): each module's tangent is
                    the gradient of a small auxiliary classifier's loss on that module's output
                    (backprop inside one module only); the forward pass then projects the true
                    gradient onto that guess.
``async_fgd``       AsyncFGD (module-wise descending asynchronism): the model is split into K modules
                    that form a pipeline, each a batch behind the previous one; module k's update is
                    K-1-k steps stale. See :mod:`edge_sdk.trainers.async_fgd`.

Every trainer computes derivatives with ``torch.autograd.forward_ad`` dual tensors made from detached
parameters under ``torch.no_grad()``: no autograd graph is built. BatchNorm runs in train mode (batch
statistics; running statistics and ``num_batches_tracked`` update once per batch, even when several
tangents re-run the forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, TYPE_CHECKING

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.func import functional_call

from edgefl_core.config import ConfigError, build_dataclass, require

from edge_sdk.trainers.base import EdgeTrainer, StepResult, register_trainer
from model_zoo.losses import gkt_loss
from model_zoo.optim import make_optimizer

if TYPE_CHECKING:
    from edge_sdk.config import EdgeConfig

# Leaf layers whose forward-mode derivative is tested against autograd (tests/test_forward_grad.py).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Identity,
)
Tangents = dict[str, torch.Tensor]  # parameter name (within one module) -> tangent


# ---------------------------------------------------------------------------------------------
# checks and model plumbing


def check_forward_mode_support(model: nn.Module, trainer: str) -> None:
    """Fail with the layer's name if the model holds a layer forward mode is not validated for."""
    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        if (is_leaf or module._parameters) and not isinstance(module, SUPPORTED_LAYERS):
            if is_leaf and not module._parameters and not module._buffers and type(module).forward is nn.Module.forward:
                continue  # an empty placeholder module
            raise ConfigError(
                f"edge.trainer={trainer}: layer {name or '<model>'!r} ({type(module).__name__}) is not supported "
                f"in forward mode; supported layers: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}")


def pipeline_chain(model: nn.Module, trainer: str) -> list[nn.Module]:
    """The model as a chain of modules whose composition gives the logits (``pipeline_modules``)."""
    chain_fn = getattr(model, "pipeline_modules", None)
    if chain_fn is None:
        raise ConfigError(f"edge.trainer={trainer}: {type(model).__name__} has no pipeline_modules(); "
                          "module-wise forward-gradient trainers need a model_zoo edge model")
    return list(chain_fn())


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def module_forward(module: nn.Module, x: torch.Tensor, tangents: Tangents | None) -> torch.Tensor:
    """``module(x)`` with the parameters named in ``tangents`` made dual. Call inside a dual level."""
    params = {}
    for name, p in module.named_parameters():
        t = None if tangents is None else tangents.get(name)
        params[name] = fwAD.make_dual(p.detach(), t) if t is not None else p.detach()
    return functional_call(module, params, (x,))


def loss_and_derivative(logits: torch.Tensor, labels, teacher, has_teacher, cfg: EdgeConfig):
    """FedGKT's edge loss on dual logits: (loss, ce, kd, primal logits, directional derivative)."""
    loss, ce, kd = gkt_loss(logits, labels, teacher, has_teacher, cfg.kd_alpha, cfg.temperature)
    primal, tangent = fwAD.unpack_dual(loss)
    derivative = 0.0 if tangent is None else float(tangent)
    return float(primal), float(fwAD.unpack_dual(ce).primal), float(fwAD.unpack_dual(kd).primal), \
        fwAD.unpack_dual(logits).primal.detach(), derivative


def directional_derivative(chain: list[nn.Module], images: torch.Tensor, tangents: list[Tangents | None],
                           labels, teacher, has_teacher, cfg: EdgeConfig, start: int = 0):
    """One forward-mode pass through ``chain[start:]``: the loss and ∇L·v for the given tangents.

    Returns (loss, ce, kd, logits, derivative, last_input), ``last_input`` being the primal input of
    the chain's last module (what its exact local gradient needs). Nothing else is kept: each
    module's activations are freed as soon as the next module has consumed them.
    """
    with torch.no_grad(), fwAD.dual_level():
        h, last_input = images, None
        for k, (module, t) in enumerate(zip(chain[start:], tangents[start:]), start):
            if k == len(chain) - 1:
                last_input = fwAD.unpack_dual(h).primal
            h = module_forward(module, h, t)
        loss, ce, kd, logits, derivative = loss_and_derivative(h, labels, teacher, has_teacher, cfg)
    return loss, ce, kd, logits, derivative, last_input


class _BufferSnapshot:
    """BatchNorm running statistics, so extra forward passes on one batch count it once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = {n: b.detach().clone() for n, b in model.named_buffers()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.saved[n])


def gaussian_like(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> Tangents:
    return {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in tensors.items()}


def forward_gradient(derivative: Callable[[Tangents], float], params: dict[str, torch.Tensor],
                     generator: torch.Generator, tangents: int = 1) -> Tangents:
    """The mean of ``tangents`` forward gradients (∇f·v) v with v ~ N(0, I): an unbiased estimate of ∇f.

    ``derivative(v)`` returns ∇f·v (one forward-mode pass); ``params`` gives the shapes.
    """
    estimate = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(tangents):
        v = gaussian_like(params, generator)
        d = derivative(v)
        for n in estimate:
            estimate[n].add_(v[n], alpha=d / tangents)
    return estimate


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) if seed is not None else int(torch.initial_seed()) % (2 ** 63))
    return g


def step_result(loss, ce, kd, logits, labels) -> StepResult:
    return StepResult(loss, ce, kd, int((logits.argmax(1) == labels).sum()), len(labels))


def _exact_local_gradient(module: nn.Module, x: torch.Tensor, labels, teacher, has_teacher,
                          cfg: EdgeConfig) -> dict[nn.Parameter, torch.Tensor]:
    """The true gradient of the loss for the chain's last module: a backward through that module only."""
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss, _, _ = gkt_loss(_logits(module(x.detach())), labels, teacher, has_teacher, cfg.kd_alpha,
                              cfg.temperature)
        grads = torch.autograd.grad(loss, params)
    return dict(zip(params, grads))


class ForwardModeTrainer(EdgeTrainer):
    """What every forward-gradient trainer sets up: validated options, the layer check, the module
    chain and the optimizer (whose state is what a checkpoint carries)."""

    options_cls: type

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.opts = build_dataclass(self.options_cls, cfg.trainer_kwargs, "edge.trainer_kwargs")
        check_forward_mode_support(model, self.name)
        self.chain = pipeline_chain(model, self.name)
        self.optimizer = make_optimizer(model.parameters(), cfg)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------------------------------
# weight-perturbed forward gradient (Baydin et al. 2022)


@dataclass
class FGWeightOptions:
    tangents: int = 1                   # K tangents per step; the estimate averages K forward gradients
    params: Literal["all", "extractor", "head", "classifier"] = "all"  # what is perturbed (the rest is frozen)
    exact_classifier: bool = False      # the last layer takes its exact (local) gradient instead
    seed: int | None = None

    def check(self) -> None:
        require(self.tangents >= 1, "tangents", f"must be >= 1, got {self.tangents}")
        require(not (self.exact_classifier and self.params == "classifier"), "exact_classifier",
                "params=classifier with exact_classifier leaves nothing to perturb")


@register_trainer("fg_weight")
class FGWeightTrainer(ForwardModeTrainer):
    options_cls = FGWeightOptions

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.generator = make_generator(self.opts.seed)
        self.perturbed = self._select(self.opts.params)
        self.classifier = self.chain[-1]
        if self.opts.exact_classifier:
            exclude = {id(p) for p in self.classifier.parameters()}
            self.perturbed = [{n: p for n, p in sel.items() if id(p) not in exclude} for sel in self.perturbed]
        if not any(self.perturbed):
            raise ConfigError(f"edge.trainer_kwargs.params={self.opts.params}: selects no parameters of this model")
        self._keys = [{n: f"{k}:{n}" for n in sel} for k, sel in enumerate(self.perturbed)]  # flat, unique keys

    def _select(self, which: str) -> list[dict[str, nn.Parameter]]:
        """Per chain module, the parameters to perturb (by their name within that module)."""
        extractor = {id(p) for p in getattr(self.model, "stem", nn.Identity()).parameters()}
        classifier = {id(p) for p in self.chain[-1].parameters()}
        keep = {"all": lambda p: True, "extractor": lambda p: id(p) in extractor,
                "head": lambda p: id(p) not in extractor, "classifier": lambda p: id(p) in classifier}[which]
        return [{n: p for n, p in m.named_parameters() if keep(p)} for m in self.chain]

    def train_step(self, images, labels, teacher_logits, has_teacher) -> StepResult:
        self.model.train()
        first: list = []

        def derivative(v: Tangents) -> float:
            tangents = [{n: v[key] for n, key in keys.items()} for keys in self._keys]
            loss, ce, kd, logits, d, classifier_input = directional_derivative(
                self.chain, images, tangents, labels, teacher_logits, has_teacher, self.cfg)
            if not first:
                first.extend((loss, ce, kd, logits, classifier_input if self.opts.exact_classifier else None,
                              _BufferSnapshot(self.model)))
            return d

        params = {key: p for sel, keys in zip(self.perturbed, self._keys) for n, p in sel.items()
                  for key in (keys[n],)}
        grads = forward_gradient(derivative, params, self.generator, self.opts.tangents)
        loss, ce, kd, logits, classifier_input, snapshot = first
        snapshot.restore()  # BN statistics as after the first pass: K tangents count the batch once
        self.optimizer.zero_grad(set_to_none=True)
        for key, p in params.items():
            p.grad = grads[key]
        if self.opts.exact_classifier:
            for p, g in _exact_local_gradient(self.classifier, classifier_input, labels, teacher_logits,
                                              has_teacher, self.cfg).items():
                p.grad = g
        self.optimizer.step()
        return step_result(loss, ce, kd, logits, labels)


# ---------------------------------------------------------------------------------------------
# forward gradient with local-gradient guesses (Fournier et al. 2023)


@dataclass
class LocalGuessOptions:
    # per_module: one forward-mode pass per module projects ∇_k L onto that module's guess (exact
    # projection, cost grows with depth); joint: one pass projects onto the concatenated guess.
    projection: Literal["per_module", "joint"] = "per_module"


class _AuxHead(nn.Module):
    """Pool + linear on a module's output: its local loss supplies that module's gradient guess."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)) if x.dim() == 4 else x)  # B x C x h x w -> B x C


@register_trainer("fg_local_guess")
class LocalGuessTrainer(ForwardModeTrainer):
    options_cls = LocalGuessOptions

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        if len(self.chain) < 2:
            raise ConfigError(f"edge.trainer={self.name}: the model has a single module; use backprop")
        self.aux: nn.ModuleList | None = None  # built on the first batch, once output shapes are known
        self._pending_aux_state: dict | None = None

    def _build_aux(self, outputs: list[torch.Tensor], num_classes: int) -> None:
        self.aux = nn.ModuleList(_AuxHead(o.shape[1], num_classes) for o in outputs)
        self.optimizer.add_param_group({"params": list(self.aux.parameters())})
        if self._pending_aux_state is not None:
            self.aux.load_state_dict(self._pending_aux_state["aux"])
            self.optimizer.load_state_dict(self._pending_aux_state["optimizer"])
            self._pending_aux_state = None

    def train_step(self, images, labels, teacher_logits, has_teacher) -> StepResult:
        self.model.train()
        snapshot = _BufferSnapshot(self.model)
        last = len(self.chain) - 1
        # 1. Local pass: each module sees a detached input, so a backward never leaves one module.
        h, inputs, guesses, aux_grads, outputs = images, [], [], [], []
        for k, module in enumerate(self.chain):
            if self.opts.projection == "per_module":
                inputs.append(h)  # the per-module projections restart from each module's input
            with torch.enable_grad():
                out = _logits(module(h))
                if k == last:
                    loss, ce, kd = gkt_loss(out, labels, teacher_logits, has_teacher, self.cfg.kd_alpha,
                                            self.cfg.temperature)
                    grads = torch.autograd.grad(loss, list(module.parameters()))
                else:
                    if self.aux is None:
                        outputs.append(out.detach())
                        guesses.append(None)
                        h = out.detach()
                        continue
                    local_loss, _, _ = gkt_loss(self.aux[k](out), labels, teacher_logits, has_teacher,
                                                self.cfg.kd_alpha, self.cfg.temperature)
                    grads = torch.autograd.grad(local_loss, list(module.parameters()) + list(self.aux[k].parameters()))
                    n = len(list(module.parameters()))
                    aux_grads.append(grads[n:])
                    grads = grads[:n]
            guesses.append(dict(zip((n for n, _ in module.named_parameters()), grads)))
            h = out.detach()
        logits = h
        if self.aux is None:  # first batch: heads did not exist yet, only the classifier learns
            self._build_aux(outputs, logits.shape[1])
            self._apply({p: g for p, g in zip(self.chain[-1].parameters(), guesses[-1].values())})
            return step_result(float(loss.detach()), float(ce), float(kd), logits, labels)
        after_local = _BufferSnapshot(self.model)
        snapshot.restore()  # the projection passes must not count this batch in BN statistics again
        # 2. Forward-mode projection of the true gradient onto each guess.
        updates: dict[nn.Parameter, torch.Tensor] = {}
        if self.opts.projection == "joint":
            tangents = guesses[:last] + [None]
            norm2 = sum(float((g * g).sum()) for t in tangents if t for g in t.values())
            *_, d, _ = directional_derivative(self.chain, images, tangents, labels, teacher_logits, has_teacher,
                                              self.cfg)
            scale = d / max(norm2, 1e-30)
            for module, t in zip(self.chain[:last], tangents[:last]):
                for name, p in module.named_parameters():
                    updates[p] = t[name] * scale
        else:
            for k in range(last):
                tangents = [None] * len(self.chain)
                tangents[k] = guesses[k]
                norm2 = sum(float((g * g).sum()) for g in guesses[k].values())
                *_, d, _ = directional_derivative(self.chain, inputs[k], tangents, labels, teacher_logits,
                                                  has_teacher, self.cfg, start=k)
                for name, p in self.chain[k].named_parameters():
                    updates[p] = guesses[k][name] * (d / max(norm2, 1e-30))
        after_local.restore()
        for p, g in zip(self.chain[-1].parameters(), guesses[-1].values()):
            updates[p] = g  # the classifier's local gradient is its true gradient
        for head, grads in zip(self.aux, aux_grads):
            updates.update(zip(head.parameters(), grads))
        self._apply(updates)
        return step_result(float(loss.detach()), float(ce), float(kd), logits, labels)

    def _apply(self, updates: dict[nn.Parameter, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in updates.items():
            p.grad = g
        self.optimizer.step()

    def state_dict(self) -> dict:
        if self.aux is None:
            return {"optimizer": self.optimizer.state_dict()}
        return {"optimizer": self.optimizer.state_dict(), "aux": self.aux.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "aux" in state:
            self._pending_aux_state = state  # heads are built lazily; load when they exist
        else:
            self.optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------------------------------
# the recommended recipe


@dataclass
class ForwardOptions(LocalGuessOptions):
    projection: Literal["per_module", "joint"] = "joint"


@register_trainer("forward")
class ForwardTrainer(LocalGuessTrainer):
    """``edge.trainer=forward``: FG with local-gradient guesses and one joint projection pass.

    Chosen by measurement (docs/FORWARD_GRADIENT.md): random-tangent methods stay near chance on the
    edge model, local guesses learn, and the joint projection costs one forward-mode pass.
    """

    options_cls = ForwardOptions
