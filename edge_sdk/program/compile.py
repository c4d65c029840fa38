"""Compile a run's edge model, FedGKT loss and trainer into ONNX graphs a torch-free device runs.

The cloud side of ``edge.engine: onnxruntime`` (needs torch; devices never import this module). Each
training step is written as a pure function of (parameters, buffers, batch) with ``torch.func``
(``grad_and_value`` for backprop, ``jvp`` for forward gradients) over ``functional_call``, traced to aten
ops with ``make_fx`` and a decomposition table, and exported with ``torch.onnx.export(dynamo=True)`` at
opset 18. Graphs:

``train_step``  inputs  ``param.<name>``, ``buffer.<name>``, ``images`` (B x C x H x W float32, normalized),
                ``labels`` (B int64), ``teacher`` (B x K float32, the server's soft labels), ``teacher_mask``
                (B float32, 1 where a soft label exists), ``valid`` (B float32, 1 for real rows; 0 for padding)
                [, ``tangent.<name>`` for forward gradients]
                outputs ``loss``, ``ce``, ``kd`` (scalars), ``logits`` (B x K), ``grad.<name>`` (backprop: every
                parameter; fg_weight: the classifier when ``exact_classifier``), [``jvp`` (scalar, ∇L·v)],
                ``buffer_out.<name>`` (BatchNorm statistics after this batch)
``extract``     inputs ``param.*``, ``buffer.*``, ``images`` (any batch) -> ``logits`` (N x K), ``features``
                (N x C x h x w), eval mode

The objective is FedGKT's edge loss (He et al. 2020, eq. 6): CE(labels) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)),
the KD term averaged over rows that have a soft label, both averaged over ``valid`` rows only.

Three exporter defects would give wrong numbers without an error; :mod:`edge_sdk.program.export_fixes`
works around them while tracing (docs/EDGE_RUNTIME.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, jvp

from edge_sdk.config import EdgeConfig
from edge_sdk.program.export_fixes import decompositions, export_patches, set_valid
from edge_sdk.program.format import PROGRAM_FORMAT, EdgeProgram, pack_program
from edge_sdk.program.spec import COMPILER_VERSION, onnx_trainer_problem
from edgefl_core.config import build_dataclass
from model_zoo import create_model, seeded

OPSET = 18
# ---------------------------------------------------------------------------------------------
# FedGKT's edge objective on a padded batch


def masked_gkt_loss(logits, labels, teacher, teacher_mask, valid, kd_alpha: float, temperature: float):
    """(loss, ce, kd): CE over ``valid`` rows + α·KD over valid rows with a soft label (T² scaled)."""
    n = valid.sum().clamp(min=1.0)
    ce = (F.cross_entropy(logits, labels, reduction="none") * valid).sum() / n
    m = teacher_mask * valid
    t = float(temperature)
    log_s, log_t = F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)                     # B
    kd = (kl * m).sum() / m.sum().clamp(min=1.0) * (t * t)
    if kd_alpha == 0:
        return ce, ce, kd * 0.0
    return ce + kd_alpha * kd, ce, kd


# ---------------------------------------------------------------------------------------------
# the step functions (flat tensor arguments, as the graphs take them)


class _ChainRunner(nn.Module):
    """The edge model as its pipeline chain: (logits, input of the last module, the classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        chain = self.model.pipeline_modules()
        for module in chain[:-1]:
            x = module(x)
        return chain[-1](x), x


@dataclasses.dataclass
class _Layout:
    params: list[str]
    buffers: list[str]
    classifier: list[str]


def _layout(model: nn.Module) -> _Layout:
    in_classifier = {id(p) for p in model.pipeline_modules()[-1].parameters()}
    return _Layout([n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()],
                   [n for n, p in model.named_parameters() if id(p) in in_classifier])


def perturbed_params(model: nn.Module, which: str, exact_classifier: bool) -> list[str]:
    """fg_weight's perturbed parameters (``trainer_kwargs.params``), as FGWeightTrainer selects them."""
    extractor = {id(p) for p in getattr(model, "stem", nn.Identity()).parameters()}
    classifier = {id(p) for p in model.pipeline_modules()[-1].parameters()}
    keep = {"all": lambda p: True, "extractor": lambda p: id(p) in extractor,
            "head": lambda p: id(p) not in extractor, "classifier": lambda p: id(p) in classifier}[which]
    return [n for n, p in model.named_parameters() if keep(p) and not (exact_classifier and id(p) in classifier)]


def _backprop_step(model, lay: _Layout, edge: EdgeConfig):
    np_, nb = len(lay.params), len(lay.buffers)

    def step(*flat):
        params, buffers = flat[:np_], flat[np_:np_ + nb]
        images, labels, teacher, teacher_mask, valid = flat[np_ + nb:]
        set_valid(valid)

        def objective(p):
            bufs = [b.clone() for b in buffers]  # the function stays pure: updated statistics are outputs
            logits, _ = functional_call(model, {**dict(zip(lay.params, p)), **dict(zip(lay.buffers, bufs))},
                                        (images,))
            loss, ce, kd = masked_gkt_loss(logits, labels, teacher, teacher_mask, valid, edge.kd_alpha,
                                           edge.temperature)
            return loss, (ce, kd, logits, bufs)

        grads, (loss, (ce, kd, logits, bufs)) = grad_and_value(objective, has_aux=True)(list(params))
        return (loss, ce, kd, logits, *grads, *bufs)
    return step, ["loss", "ce", "kd", "logits"] + [f"grad.{n}" for n in lay.params] + \
        [f"buffer_out.{n}" for n in lay.buffers]


def _fg_weight_step(model, lay: _Layout, edge: EdgeConfig, perturbed: list[str], exact_classifier: bool):
    np_, nb = len(lay.params), len(lay.buffers)
    runner = _ChainRunner(model)
    classifier_module = model.pipeline_modules()[-1]
    local = {id(p): n for n, p in classifier_module.named_parameters()}
    classifier_local = [local[id(p)] for n, p in model.named_parameters() if n in lay.classifier]

    def step(*flat):
        params, buffers = dict(zip(lay.params, flat[:np_])), flat[np_:np_ + nb]
        images, labels, teacher, teacher_mask, valid = flat[np_ + nb:np_ + nb + 5]
        tangents = list(flat[np_ + nb + 5:])
        set_valid(valid)
        fixed = {n: v for n, v in params.items() if n not in perturbed}

        def objective(pp):
            bufs = [b.clone() for b in buffers]
            state = {**{"model." + n: v for n, v in zip(perturbed, pp)}, **{"model." + n: v for n, v in fixed.items()},
                     **{"model." + n: b for n, b in zip(lay.buffers, bufs)}}
            logits, last_input = functional_call(runner, state, (images,))
            loss, ce, kd = masked_gkt_loss(logits, labels, teacher, teacher_mask, valid, edge.kd_alpha,
                                           edge.temperature)
            return loss, (ce, kd, logits, last_input, bufs)

        loss, derivative, (ce, kd, logits, last_input, bufs) = jvp(
            objective, ([params[n] for n in perturbed],), (tangents,), has_aux=True)
        outputs = [loss, ce, kd, logits, derivative]
        if exact_classifier:  # the classifier's true gradient: a backward through its own input only
            def classifier_loss(cp):
                out = functional_call(classifier_module, dict(zip(classifier_local, cp)), (last_input.detach(),))
                return masked_gkt_loss(out, labels, teacher, teacher_mask, valid, edge.kd_alpha, edge.temperature)[0]
            outputs += grad(classifier_loss)([params[n] for n in lay.classifier])
        return (*outputs, *bufs)
    names = ["loss", "ce", "kd", "logits", "jvp"] + ([f"grad.{n}" for n in lay.classifier] if exact_classifier else [])
    return step, names + [f"buffer_out.{n}" for n in lay.buffers]


def _extract_fn(model, lay: _Layout):
    np_ = len(lay.params)

    def extract(*flat):
        state = {**dict(zip(lay.params, flat[:np_])), **dict(zip(lay.buffers, flat[np_:-1]))}
        logits, features = functional_call(model, state, (flat[-1],))
        return logits, features
    return extract, ["logits", "features"]


# ---------------------------------------------------------------------------------------------
# tracing and export


class _Flat(nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *flat):
        return self.gm(*flat)


def export_graph(fn, args: list[torch.Tensor], input_names: list[str], output_names: list[str],
                 batch_inputs: list[int], *, dynamic_batch: bool, valid: torch.Tensor | None,
                 batch_norm: bool = True, forward_mode: bool = False) -> bytes:
    """Trace ``fn(*args)`` to aten ops (decomposed) and export it as a serialized ONNX ModelProto."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with export_patches(valid, batch_norm=batch_norm, forward_mode=forward_mode):
        gm = make_fx(fn, decomposition_table=decompositions(batch_norm),
                     tracing_mode="symbolic" if dynamic_batch else "real")(*args)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=2, max=65536)
        dynamic = (tuple({0: batch} if i in batch_inputs else None for i in range(len(args))),)
    program = torch.onnx.export(_Flat(gm), tuple(args), None, dynamic_shapes=dynamic, dynamo=True,
                                opset_version=OPSET, input_names=input_names, output_names=output_names,
                                verbose=False)
    program.optimize()
    return program.model_proto.SerializeToString()


def _example_batch(batch: int, input_shape, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *input_shape, generator=g), torch.randint(0, num_classes, (batch,), generator=g),
            torch.randn(batch, num_classes, generator=g), (torch.rand(batch, generator=g) > 0.5).float(),
            torch.ones(batch))


BATCH_INPUTS = ["images", "labels", "teacher", "teacher_mask", "valid"]


def build_model(edge: EdgeConfig, num_classes: int, input_shape, seed: int) -> nn.Module:
    with seeded(seed):
        return create_model(edge.model, num_classes=num_classes, in_channels=input_shape[0], **edge.model_kwargs)


def compile_program(edge: EdgeConfig, num_classes: int, input_shape, seed: int = 0, *,
                    batch_norm_fix: bool = True) -> EdgeProgram:
    """The edge program of ``edge`` (model, trainer, FedGKT loss) for ``num_classes`` and ``input_shape``
    (C, H, W); the initial state is the model built with ``seed``. Raises ValueError for trainers the
    onnxruntime engine does not run (:data:`WHY_NOT`). ``batch_norm_fix=False`` exports train-mode batch norm
    as torch does (the known-wrong lowering; only the parity test wants that)."""
    problem = onnx_trainer_problem(edge.trainer)
    if problem:
        raise ValueError(f"edge.trainer={edge.trainer} cannot run on edge.engine=onnxruntime: {problem}")
    input_shape = tuple(int(s) for s in input_shape)
    model = build_model(edge, num_classes, input_shape, seed)
    lay = _layout(model)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    state_names = [f"param.{n}" for n in lay.params] + [f"buffer.{n}" for n in lay.buffers]
    manifest: dict = {"format": PROGRAM_FORMAT, "trainer": edge.trainer, "trainer_options": {},
                      "optimizer": {"name": edge.optimizer, "lr": edge.lr, "momentum": edge.momentum,
                                    "weight_decay": edge.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
                      "params": lay.params, "buffers": lay.buffers, "classifier": lay.classifier,
                      "num_classes": num_classes, "input_shape": list(input_shape), "batch_size": edge.batch_size,
                      "kd_alpha": edge.kd_alpha, "temperature": edge.temperature, "edge": dataclasses.asdict(edge),
                      "compiler": {"version": COMPILER_VERSION, "torch": torch.__version__, "opset": OPSET},
                      "graphs": {}}
    graphs = {}
    batch = max(2, edge.batch_size)
    example = _example_batch(batch, input_shape, num_classes)
    if edge.trainer == "backprop":
        model.train()
        fn, outputs = _backprop_step(model, lay, edge)
        args = [*params, *buffers, *example]
        batch_positions = list(range(len(params) + len(buffers), len(args)))
        graphs["train_step"] = export_graph(fn, args, state_names + BATCH_INPUTS, outputs, batch_positions,
                                            dynamic_batch=True, valid=example[-1], batch_norm=batch_norm_fix)
        manifest["trainable"] = lay.params
        manifest["graphs"]["train_step"] = {"inputs": state_names + BATCH_INPUTS, "outputs": outputs, "batch": None}
    else:
        from edge_sdk.trainers.forward_grad import FGWeightOptions
        opts = build_dataclass(FGWeightOptions, edge.trainer_kwargs, "edge.trainer_kwargs")
        perturbed = perturbed_params(model, opts.params, opts.exact_classifier)
        if not perturbed:
            raise ValueError(f"edge.trainer_kwargs.params={opts.params}: selects no parameters of this model")
        model.train()
        fn, outputs = _fg_weight_step(model, lay, edge, perturbed, opts.exact_classifier)
        shapes = dict(zip(lay.params, params))
        tangents = [torch.randn_like(shapes[n]) for n in perturbed]
        inputs = state_names + BATCH_INPUTS + [f"tangent.{n}" for n in perturbed]
        graphs["train_step"] = export_graph(fn, [*params, *buffers, *example, *tangents], inputs, outputs, [],
                                            dynamic_batch=False, valid=example[-1], batch_norm=batch_norm_fix,
                                            forward_mode=True)
        manifest["trainer_options"] = dataclasses.asdict(opts)
        manifest["perturbed"] = perturbed
        manifest["trainable"] = perturbed + (lay.classifier if opts.exact_classifier else [])
        manifest["graphs"]["train_step"] = {"inputs": inputs, "outputs": outputs, "batch": batch}
    model.eval()
    fn, outputs = _extract_fn(model, lay)
    args = [*params, *buffers, example[0]]
    graphs["extract"] = export_graph(fn, args, state_names + ["images"], outputs, [len(args) - 1],
                                     dynamic_batch=True, valid=None)
    manifest["graphs"]["extract"] = {"inputs": state_names + ["images"], "outputs": outputs, "batch": None}
    with torch.no_grad():
        manifest["feature_shape"] = list(model.forward_features(example[0][:2]).shape[1:])
    # no timings in the manifest: a program's bytes, and so its digest, depend only on its spec
    state = {n: t.numpy() for n, t in zip(lay.params + lay.buffers, params + buffers)}
    return EdgeProgram(manifest, graphs, state)


# ---------------------------------------------------------------------------------------------
# the spec a runtime compiles from, and the command that compiles it in a fresh process


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_sdk.program.compile SPEC.json OUT``: compile in this (fresh) process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="JSON file: program_spec(...)")
    parser.add_argument("out", help="where to write the packed program")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = json.loads(Path(args.spec).read_text())
    edge = build_dataclass(EdgeConfig, spec["edge"], "edge")
    program = compile_program(edge, spec["num_classes"], spec["input_shape"], spec.get("seed", 0))
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_bytes(pack_program(program))
    tmp.replace(args.out)
    print(json.dumps({"bytes": (Path(args.out)).stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
