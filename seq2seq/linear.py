"""Linear layers on a CPU through oneDNN, with the bias (and a following ReLU) fused in.

For a float32 `F.linear` on a CPU, torch calls MKL's sgemm, after copying the bias into every
row of the output, and a ReLU after it is one more pass over that output. oneDNN, which torch
also ships (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend emits
for a linear layer), adds the bias and applies the ReLU inside the matmul. On this project's
CPU (2-core AMD EPYC with AVX-512) it ran the model's shapes at about 200 GFLOP/s where MKL ran
them at 120-185 (`seq2seq bench` and the README give the figures).

`linear(layer, x)` takes that path for an `nn.Linear` in float32 on a CPU in training, in the
forward pass and for the gradient with respect to the input; the loss's output projection
calls `matmul_t`. The weight gradient stays with `torch.mm`: oneDNN would first need both of its
operands transposed. Everywhere else (accelerators, other dtypes, autocast, a quantized layer,
torch.compile, inference) it is the layer's own forward, then ReLU. Results equal `F.linear`'s
to float32 rounding; `SEQ2SEQ_ONEDNN=0` turns the path off.

Decoding is the exception for one layer: the output projection, the largest matmul of every
decoding step, runs on oneDNN with its weight packed into oneDNN's own layout once per search
(`pack`, `packed_matmul_t`).

oneDNN builds a kernel per matrix shape and caches them, and every training batch brings new
shapes: the `seq2seq` command bounds its caches (`cli.RUNTIME_ENV`), and a program that trains
the model in its own loop should export the same variables.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: False when SEQ2SEQ_ONEDNN=0, or when this torch has no oneDNN linear kernel.
ENABLED = (
    os.environ.get("SEQ2SEQ_ONEDNN", "1") != "0"
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def available() -> bool:
    """Whether the oneDNN path is on in this process (torch.backends.mkldnn.enabled included)."""
    return ENABLED and torch.backends.mkldnn.enabled


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T goes through oneDNN: float32 on a CPU, outside autocast and
    torch.compile, with at least one row."""
    return (
        available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """x (M, K) @ weight.T (K, N) + bias (N,), then ReLU if asked -> (M, N); no autograd.

    `weight` may be any strided view (the input gradient passes `weight.t()`)."""
    if uses_onednn(x, weight):
        return _onednn_matmul_t(x, weight, bias, relu)
    y = F.linear(x, weight, bias)
    return y.relu_() if relu else y


def _onednn_matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


#: Whether this torch can pack a weight for oneDNN's linear kernel.
_PACKING = ENABLED and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(weight: Tensor, x: Tensor) -> Tensor:
    """`weight` (N, K) packed into oneDNN's own layout for `packed_matmul_t`, where x @ weight.T
    runs on oneDNN without gradients; otherwise `weight` itself. The packed copy does not
    follow later changes to the weight: a decoding search packs the output projection once
    (`DecoderCache.output_weight`) and then runs it at every step.

    On this project's CPU a beam-5 decode spent a quarter of its time in that matmul through
    MKL (8,000 x 256 weight, 5-1,575 rows a step); packed oneDNN ran it 1.5-2x as fast (README).
    For the decoder's smaller layers, the row counts that change as sentences finish cost
    oneDNN more than it gains."""
    if not _PACKING or torch.is_grad_enabled() or not uses_onednn(x, weight):
        return weight
    # The row count is a hint for oneDNN's layout; any number of rows can use the packed weight.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 256)


def packed_matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight.T + bias -> (..., N), with `weight` from `pack`."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    y = _onednn_matmul_t(x.reshape(-1, x.size(-1)), weight, bias, False)
    return y.view(*x.shape[:-1], y.size(-1))


def linear(layer: nn.Module, x: Tensor, relu: bool = False) -> Tensor:
    """layer(x) (..., out), then ReLU if asked; through oneDNN where `uses_onednn` says so and
    gradients are wanted.

    Inference keeps the layer's own forward: decoding meets a new matrix shape at nearly every
    step (sentences finish), and measured no faster through oneDNN (greedy 269-333 against
    337-362 sentences/s, beam 5 131-139 against 126-127, README). A layer with forward hooks
    also runs its own forward, so that the hooks see the call."""
    if _trains_through_onednn(layer, x):
        return _OneDnnLinear.apply(x, layer.weight, layer.bias, relu)
    y = layer(x)
    return F.relu(y) if relu else y


def _trains_through_onednn(layer: nn.Module, x: Tensor) -> bool:
    if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
        return False
    params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
    grads = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return grads and uses_onednn(x, layer.weight)


class _OneDnnLinear(torch.autograd.Function):
    """y = x @ weight.T + bias (then ReLU), forward and input gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (M, K)
        y = _onednn_matmul_t(x2, weight, bias, relu)  # (M, N); `linear` checked the case
        # ReLU's gradient mask is read from its output (y > 0 exactly where the input was).
        ctx.save_for_backward(x2, weight, y if relu else None)
        ctx.relu, ctx.x_shape, ctx.has_bias = relu, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x2, weight, y = ctx.saved_tensors
        g = grad_y.reshape(-1, weight.size(0))  # (M, N)
        if ctx.relu:
            g = torch.ops.aten.threshold_backward(g, y, 0)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = _onednn_matmul_t(g, weight.t(), None, False).view(ctx.x_shape) if need_x else None
        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None
