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

Three exporter defects would give wrong numbers without an error (docs/EDGE_RUNTIME.md; the parity tests
in tests/test_edge_program.py guard each):
1. torchlib lowers train-mode batch norm as inference (input running statistics, returned unchanged):
   :func:`_batch_norm` replaces ``F.batch_norm`` while tracing, written in plain reductions (and masked by
   ``valid``, which is what lets a fixed-batch graph take a short last batch);
2. torchlib's ``nll_loss`` fakes ``total_weight`` = 1 (mean-reduced gradients come out ×batch): nll_loss
   forward/backward are decomposed;
3. ``convolution_backward`` has no lowering: :func:`_convolution_backward` writes it as a transposed
   convolution (input gradient) and a convolution of the transposed input with the transposed output
   gradient (weight gradient, stride and dilation swapped).
Forward mode: the C++ jvp rules of convolution and batch norm specialize the batch dimension, so
``F.conv2d`` gets a Python jvp (:class:`_Conv2dJvp`) and the forward-gradient graph has a fixed batch
(``manifest.graphs.train_step.batch``): a short last batch is padded with ``valid = 0`` rows, which the
masked batch norm and loss ignore exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._decomp import get_decompositions
from torch.func import functional_call, grad, grad_and_value, jvp

from edge_sdk.config import EdgeConfig
from edge_sdk.program.format import PROGRAM_FORMAT, EdgeProgram, pack_program
from edge_sdk.program.spec import COMPILER_VERSION, onnx_trainer_problem
from edgefl_core.config import build_dataclass
from model_zoo import create_model, seeded

aten = torch.ops.aten
OPSET = 18
# ---------------------------------------------------------------------------------------------
# the decompositions that make exported graphs correct


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """aten.convolution_backward for 2-D, ungrouped, non-transposed convolutions."""
    if transposed or groups != 1 or weight.dim() != 4:
        raise NotImplementedError("edge program export: only ungrouped 2-D convolutions")
    grad_input = grad_weight = grad_bias = None
    kh, kw = weight.shape[2:]
    if output_mask[0]:  # the input size a transposed convolution must restore (stride may floor it)
        extra = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                      + dilation[i] * ((kh, kw)[i] - 1) + 1) for i in range(2)]
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, 1)
    if output_mask[1]:
        grad_weight = _conv_weight_grad(grad_output, input, weight, stride, padding, dilation)
    if output_mask[2]:
        grad_bias = grad_output.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias


def _conv_weight_grad(grad_output, input, weight, stride, padding, dilation):
    """dL/dW[o, c, i, j] = sum over b, y, x of g[b, o, y, x] * x_pad[b, c, y*s + i*d, x*s + j*d]: one MatMul over
    im2col columns built from k*k strided slices (onnxruntime runs this faster than the equivalent
    convolution of the transposed input with the transposed gradient)."""
    co, ci, kh, kw = weight.shape
    oh, ow = grad_output.shape[2], grad_output.shape[3]
    x = aten.constant_pad_nd(input, [padding[1], padding[1], padding[0], padding[0]], 0.0) \
        if padding[0] or padding[1] else input
    columns = [x[:, :, i * dilation[0]: i * dilation[0] + stride[0] * (oh - 1) + 1: stride[0],
                 j * dilation[1]: j * dilation[1] + stride[1] * (ow - 1) + 1: stride[1]]
               for i in range(kh) for j in range(kw)]                          # k*k of B x C_in x oh x ow
    cols = columns[0].unsqueeze(2) if len(columns) == 1 else torch.stack(columns, dim=2)  # B x C_in x k*k x oh x ow
    cols = cols.permute(1, 2, 0, 3, 4).reshape(ci * kh * kw, -1)               # (C_in k k) x (B oh ow)
    g = grad_output.permute(1, 0, 2, 3).reshape(co, -1)                        # C_out x (B oh ow)
    return torch.mm(g, cols.t()).reshape(co, ci, kh, kw)


def _threshold_backward(grad, output, threshold):
    """ReLU's backward as a multiply by the mask (cheaper in onnxruntime than a Where)."""
    return grad * (output > threshold).to(grad.dtype)


BATCH_NORM_OPS = (aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional,
                  aten._native_batch_norm_legit_no_training, aten.native_batch_norm_backward)


def decompositions(batch_norm: bool = True) -> dict:
    """The decomposition table for tracing; ``batch_norm=False`` leaves batch norm to torchlib (wrong)."""
    table = get_decompositions([aten.nll_loss_forward, aten.nll_loss_backward, aten._log_softmax_backward_data,
                                aten._softmax_backward_data, *(BATCH_NORM_OPS if batch_norm else ())])
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.threshold_backward.default] = _threshold_backward
    return table


_VALID: list[torch.Tensor] = []   # the ``valid`` row mask of the graph being traced
_conv2d = F.conv2d
_torch_batch_norm = F.batch_norm


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """BatchNorm over the ``valid`` rows only, in plain reductions (train: batch statistics, biased for the
    output, unbiased for the running variance, as torch does)."""
    shape = (1, -1, 1, 1)
    if training:
        w = _VALID[-1].to(x.dtype).view(-1, 1, 1, 1)                 # B x 1 x 1 x 1
        count = w.sum() * (x.shape[2] * x.shape[3])
        mean = (x * w).sum((0, 2, 3)) / count                          # C
        centered = x - mean.view(shape)
        var = (centered * centered * w).sum((0, 2, 3)) / count        # C (biased)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)) * momentum)
        y = centered * torch.rsqrt(var + eps).view(shape)
    else:
        y = (x - running_mean.view(shape)) * torch.rsqrt(running_var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    return y + bias.view(shape) if bias is not None else y


class _Conv2dJvp(torch.autograd.Function):
    """conv2d with a Python forward-mode rule: d(conv(x, w) + b) = conv(dx, w) + conv(x, dw) + db."""

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return _conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.conv_args = inputs[3:]

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_):
        x, w = ctx.saved_tensors
        terms = []
        if tx is not None:
            terms.append(_conv2d(tx, w, None, *ctx.conv_args))
        if tw is not None:
            terms.append(_conv2d(x, tw, None, *ctx.conv_args))
        if tb is not None:
            terms.append(tb.view(1, -1, 1, 1))
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out


def _conv2d_jvp(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return _Conv2dJvp.apply(x, w, b, stride, padding, dilation, groups)


@contextlib.contextmanager
def export_patches(valid: torch.Tensor | None, *, batch_norm: bool = True, forward_mode: bool = False):
    """While tracing: the masked batch norm (unless ``batch_norm=False``: the parity test's broken export)
    and, for forward mode, the Python conv2d jvp. Process-global: compile in a process of its own."""
    _VALID.append(valid if valid is not None else torch.ones(1))
    if batch_norm:
        F.batch_norm = _batch_norm
    if forward_mode:
        F.conv2d = _conv2d_jvp
    try:
        yield
    finally:
        F.batch_norm, F.conv2d = _torch_batch_norm, _conv2d
        _VALID.pop()


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
        _VALID[-1] = valid

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
        _VALID[-1] = valid
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
