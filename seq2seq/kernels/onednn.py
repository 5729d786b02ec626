"""Linear layers on a CPU through oneDNN, with the bias (and a following ReLU) fused in.

For a float32 `F.linear` on a CPU, torch calls MKL's sgemm, after copying the bias into every
row of the output, and a ReLU after it is one more pass over that output. oneDNN, which torch
also ships (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend emits
for a linear layer), adds the bias and applies the ReLU inside the matmul; on an AVX-512 CPU
it ran the model's training shapes at about 200 GFLOP/s where MKL ran them at 120-185.

Three swaps, each applied to a plain model from outside it:
- `use_onednn_linears(model)` (fit time): every `nn.Linear` becomes a `OneDnnLinear`, which
  trains through oneDNN (forward and input gradient; the weight gradient stays `torch.mm`) in
  float32 on a CPU, and is the plain layer everywhere else (accelerators, other dtypes,
  autocast, torch.compile, inference). A Linear registered right before an `nn.ReLU` in the
  same parent (as the feed-forward network's first layer and its activation) takes the ReLU
  into the kernel, and the ReLU becomes an `nn.Identity`.
- `use_packed_projection(model)` (load time, for decoding): the output projection, the largest
  matmul of every decoding step, runs on oneDNN with its weight packed once into oneDNN's own
  layout (`PackedLinear`), at a few bucketed row counts (`row_bucket`); through MKL it took a
  quarter of a beam-5 decode.
- `use_packed_bf16_decoder(model)` (load time, for decoding in bf16): the same for every layer
  that runs at each decoding step, the projection and the decoder layers' (bf16's `F.linear`
  builds a oneDNN kernel for each new row count).

All need private torch ops. Each swap first checks that its op exists and computes what it
should on a small case (`onednn_works`, `packing_works`, `bf16_packing_works`); if not (torch
removed or changed it), the model keeps its plain layers and one warning says so.
`SEQ2SEQ_ONEDNN=0` turns them off. Results equal `F.linear`'s to float32 (bf16) rounding.

oneDNN builds a kernel per matrix shape and caches them, and every training batch brings new
shapes: the `seq2seq` command bounds its caches (`cli.RUNTIME_ENV`), and a program that trains
the model in its own loop should export the same variables.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from seq2seq.kernels.swap import float32_on_cpu, runs_every_step, swap_linears

log = logging.getLogger(__name__)


def _op(name: str):
    return getattr(getattr(torch.ops, "mkldnn", None), name, None)


def _probe_case() -> tuple[Tensor, Tensor, Tensor]:
    """A small x, weight, bias from a generator of its own: probing must not move torch's
    global random stream, or a run would train differently depending on whether the probe
    had already run in its process (a resumed run would not replay exactly)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(3, 8, generator=g),
        torch.randn(5, 8, generator=g),
        torch.randn(5, generator=g),
    )


@functools.cache
def onednn_works() -> bool:
    """Whether `torch.ops.mkldnn._linear_pointwise` exists here and computes x @ w.T + b
    (then ReLU) with the signature this module calls; warns once when it does not."""
    if os.environ.get("SEQ2SEQ_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    x, w, b = _probe_case()
    try:
        y = _op("_linear_pointwise")(x, w, b, "relu", [], "")
        ok = torch.allclose(y, F.linear(x, w, b).relu(), atol=1e-5)
    except Exception:  # missing (None is not callable), or a changed signature
        ok = False
    if not ok:
        warnings.warn(
            f"torch {torch.__version__} has no working torch.ops.mkldnn._linear_pointwise; "
            "linear layers run on torch's default kernels",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


@functools.cache
def packing_works() -> bool:
    """Whether `torch.ops.mkldnn._reorder_linear_weight` packs a weight that
    `_linear_pointwise` then multiplies correctly; warns once when it does not."""
    if not onednn_works():
        return False
    x, w, b = _probe_case()
    try:
        packed = _op("_reorder_linear_weight")(w, 256)
        y = _op("_linear_pointwise")(x, packed, b, "none", [], "")
        ok = torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    except Exception:
        ok = False
    if not ok:
        warnings.warn(
            f"torch {torch.__version__} has no working torch.ops.mkldnn._reorder_linear_weight; "
            "the output projection decodes on torch's default kernels",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


def uses_onednn(
    x: Tensor, weight: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> bool:
    """Whether x @ weight.T can go through oneDNN: both of one of `dtypes` (float32 unless
    told) on a CPU, outside autocast and torch.compile, with at least one row (the op's own
    check is `onednn_works`)."""
    return (
        torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and weight.dtype == x.dtype
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    return _op("_linear_pointwise")(x, weight, bias, "relu" if relu else "none", [], "")


def matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """x (M, K) @ weight.T (K, N) + bias (N,), then ReLU if asked -> (M, N); no autograd.
    `weight` may be any strided view (the input gradient passes `weight.t()`). The loss's
    fused output projection takes this in training (`seq2seq.nn.loss`)."""
    if onednn_works() and uses_onednn(x, weight):
        return _onednn_matmul_t(x, weight, bias, relu)
    y = F.linear(x, weight, bias)
    return y.relu_() if relu else y


class OneDnnLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict), trained through oneDNN in float32 on a
    CPU, with an optional fused ReLU. As the output layer it also lends the loss its kernel
    for the fused projection (`matmul_t`, see `seq2seq.nn.loss.translation_loss`)."""

    matmul_t = staticmethod(matmul_t)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, relu: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.relu = relu

    @classmethod
    def of(cls, layer: nn.Linear, relu: bool = False) -> OneDnnLinear:
        """A OneDnnLinear sharing `layer`'s parameters (the optimizer and state_dict see the
        same tensors under the same names)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.relu = layer.in_features, layer.out_features, relu
        new.weight, new.bias = layer.weight, layer.bias
        new.train(layer.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        grads = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
        )
        if grads and uses_onednn(x, self.weight):
            return _OneDnnLinear.apply(x, self.weight, self.bias, self.relu)
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x @ weight.T + bias (then ReLU), forward and input gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (M, K)
        y = _onednn_matmul_t(x2, weight, bias, relu)  # (M, N)
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


def use_onednn_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` for a `OneDnnLinear` on the same parameters, fusing
    an `nn.ReLU` registered right after a Linear in the same parent. Returns the number of
    layers swapped (0, with one warning, when oneDNN's op is not usable here)."""
    if not onednn_works():
        return 0
    return swap_linears(model, lambda layer, relu: OneDnnLinear.of(layer, relu=relu))


def row_bucket(rows: int) -> int:
    """The row count a packed matmul of `rows` rows runs at: exact up to 16, then rounded up to
    a multiple of an eighth of the next power of two (17..32 -> 20, 24, 28, 32; 33..64 -> 40,
    48, 56, 64). A decode meets a new row count at nearly every step of every batch, and oneDNN
    builds and caches a kernel per count: with 3,000 random counts up to 600 (a 256 x 8,000
    weight, 2 threads) the process grew from 244 to 772 MiB unbucketed, and stayed at 294
    bucketed (MKL's `F.linear`: 314). Four buckets per power of two serve any input, for under
    a quarter more rows of work (under a tenth on average)."""
    if rows <= 16:
        return rows
    step = (1 << (rows - 1).bit_length()) // 8
    return -(-rows // step) * step


#: What `PackedLinear` multiplies through oneDNN (other dtypes take F.linear).
PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """An inference-only copy of a linear layer (and, with `relu`, the ReLU after it) whose
    weight is packed once into oneDNN's layout: x @ W.T + b for float32 or bf16 CPU inputs of
    the weight's dtype, its rows zero-padded to `row_bucket`. It holds no parameters of its
    own, so the model's state_dict is unchanged; its packed weight does not follow later
    changes to the layer's weight (pack again after training)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, relu: bool = False):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.relu = relu
        # The row count is a hint for oneDNN's layout; any number of rows can use it.
        self.packed = _op("_reorder_linear_weight")(self.weight, 256)

    @classmethod
    def of(cls, layer: nn.Linear, relu: bool = False) -> PackedLinear:
        return cls(layer.weight, layer.bias, relu)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not uses_onednn(x, self.weight, PACKED_DTYPES):
            y = F.linear(x, self.weight, self.bias)
            return F.relu(y) if self.relu else y
        x2 = x.reshape(-1, x.size(-1))
        rows = x2.size(0)
        padded = row_bucket(rows)
        if padded != rows:
            x2 = torch.cat([x2, x2.new_zeros(padded - rows, x2.size(1))])
        y = _onednn_matmul_t(x2, self.packed, self.bias, self.relu)[:rows]
        return y.view(*x.shape[:-1], y.size(-1))


def use_packed_projection(model: nn.Module, name: str = "generator") -> bool:
    """Replace `model.<name>` (a linear layer) by a `PackedLinear` of its weight, for decoding
    in float32 on a CPU. Returns whether it did (not where packing is unusable, with one
    warning, nor for other dtypes or devices)."""
    layer = getattr(model, name)
    if not (packing_works() and float32_on_cpu(layer)):
        return False
    setattr(model, name, PackedLinear(layer.weight, layer.bias))
    return True


@functools.cache
def bf16_packing_works() -> bool:
    """Whether oneDNN packs a bf16 weight that `_linear_pointwise` then multiplies (with the
    ReLU) as F.linear does, to bf16 rounding; warns once when it does not."""
    if not packing_works():
        return False
    x, w, b = (t.bfloat16() for t in _probe_case())
    try:
        packed = _op("_reorder_linear_weight")(w, 256)
        y = _op("_linear_pointwise")(x, packed, b, "relu", [], "")
        ok = torch.allclose(y.float(), F.linear(x, w, b).relu().float(), atol=0.05, rtol=0.02)
    except Exception:
        ok = False
    if not ok:
        warnings.warn(
            f"torch {torch.__version__}'s oneDNN does not multiply packed bf16 weights; the "
            "bf16 decoder runs on torch's default kernels",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


def use_packed_bf16_decoder(model: nn.Module) -> int:
    """Decoding in bf16 on a CPU: swap the linear layers that run at every decoding step (the
    decoder layers' but the cross-attention's key/value projection, and the output
    projection `generator`) for `PackedLinear`s, their ReLUs fused in. A bf16 `F.linear` lets
    oneDNN build a kernel for each new row count, and a decode meets one at nearly every step:
    on a 2-core Xeon with AMX such a first call ran the decoder's shapes at 22-221 GFLOP/s
    against 300-880 once built; `row_bucket` keeps the counts to a few dozen, built once. The
    default recipe's bf16 decode there ran greedy 11% and beam 5 13% faster (in-process
    alternation, after both had built their kernels; the same output). Returns how many layers
    were swapped (0 where bf16 packing fails here, or the weights are not bf16 on a CPU)."""
    generator = getattr(model, "generator", None)
    if not (
        type(generator) is nn.Linear
        and generator.weight.device.type == "cpu"
        and generator.weight.dtype == torch.bfloat16
        and bf16_packing_works()
    ):
        return 0
    swapped = swap_linears(
        model.decoder_layers, PackedLinear.of, lambda name, _: runs_every_step(name)
    )
    model.generator = PackedLinear.of(generator)
    return swapped + 1
