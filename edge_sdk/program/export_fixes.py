"""While tracing an edge program (:mod:`edge_sdk.program.compile`): the decompositions and patches that make
the exported ONNX graphs compute what torch computes (torch 2.13, onnxscript's torchlib, opset 18).

Three exporter defects would give wrong numbers without an error (docs/EDGE_RUNTIME.md; the parity tests
in tests/test_edge_program.py guard each):
1. torchlib lowers train-mode batch norm as inference (input running statistics, returned unchanged):
   :func:`_batch_norm` replaces ``F.batch_norm`` while tracing, written in plain reductions (and masked by
   ``valid``, which is what lets a fixed-batch graph take a short last batch);
2. torchlib's ``nll_loss`` fakes ``total_weight`` = 1 (mean-reduced gradients come out ×batch): nll_loss
   forward/backward are decomposed;
3. ``convolution_backward`` has no lowering: :func:`_convolution_backward` writes it as a transposed
   convolution (input gradient) and one im2col MatMul (weight gradient, :func:`_conv_weight_grad`).
ReLU's backward becomes a multiply by the mask (faster in onnxruntime than a Where; not a correctness fix).
Forward mode: the C++ jvp rules of convolution and batch norm specialize the batch dimension, so
``F.conv2d`` gets a Python jvp (:class:`_Conv2dJvp`) and the forward-gradient graph has a fixed batch
(``manifest.graphs.train_step.batch``): a short last batch is padded with ``valid = 0`` rows, which the
masked batch norm and loss ignore exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._decomp import get_decompositions

aten = torch.ops.aten

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


def set_valid(valid: torch.Tensor) -> None:
    """Inside a traced step: the batch's ``valid`` row mask (B float32) the masked batch norm uses."""
    _VALID[-1] = valid

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
