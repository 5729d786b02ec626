"""The decoder's linear layers on MKL with their weights packed once, for decoding on a CPU.

A float32 `F.linear` on a CPU calls MKL's sgemm, which first copies the weight into its own
blocked layout, on every call. A decoding step multiplies a few dozen to a few hundred rows
by each weight, so that copy is a large share of the call: MKL's packed API
(`cblas_sgemm_pack` once, `cblas_sgemm_compute` per call; torch's private
`torch.ops.mkl._mkl_reorder_linear_weight` and `_mkl_linear`, which torch.compile's CPU
backend emits for a linear layer) skips it. On a 2-core Intel Xeon (AVX-512) it ran the
decoder's shapes 1.1-2x faster than `F.linear`, most at 16-64 rows. Unlike oneDNN
(`seq2seq.kernels.onednn`), it builds nothing per row count: any number of rows uses the same
packed weight.

`use_mkl_packed_decoder(model)` (load time) swaps the linear layers that run at every
decoding step (the decoder layers', and the output projection when asked: `prepare_model` asks
on an Intel CPU, where it beat oneDNN's packed projection, beam 5 by 10-14%) for
`MklPackedLinear`s. Each packed weight costs about 8 MiB of MKL's own on top of the weight:
the encoder's layers, which run once per batch on thousands of rows, keep `F.linear`.

It needs private torch ops: `mkl_packing_works` first checks that they exist and compute what
they should on a small case; if not (a torch without MKL, as on ARM, or one that changed
them), the model keeps its plain layers (one warning when the ops are there but wrong).
`SEQ2SEQ_MKL_PACK=0` turns it off. Results equal `F.linear`'s to float32 rounding.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.kernels.swap import float32_on_cpu, runs_every_step, swap_linears


def _op(name: str):
    return getattr(getattr(torch.ops, "mkl", None), name, None)


#: The row count MKL's packing is told to expect; the packed weight serves any count.
_PACK_ROWS = 256


@functools.cache
def mkl_packing_works() -> bool:
    """Whether torch's MKL packed linear ops exist here and compute x @ w.T + b; warns once
    when they exist but fail."""
    if os.environ.get("SEQ2SEQ_MKL_PACK", "1") == "0" or not torch.backends.mkl.is_available():
        return False
    if _op("_mkl_reorder_linear_weight") is None or _op("_mkl_linear") is None:
        return False
    g = torch.Generator().manual_seed(0)  # torch's global random stream stays untouched
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((3, 8), (5, 8), (5,)))
    try:
        packed = _op("_mkl_reorder_linear_weight")(w, _PACK_ROWS)
        ok = torch.allclose(_op("_mkl_linear")(x, packed, w, b, 3), F.linear(x, w, b), atol=1e-5)
    except Exception:  # a changed signature
        ok = False
    if not ok:
        warnings.warn(
            f"torch {torch.__version__}'s torch.ops.mkl._mkl_linear does not compute a linear "
            "layer; the decoder's linear layers run on F.linear",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


class MklPackedLinear(nn.Module):
    """A decoding-only linear layer (and, with `relu`, the ReLU after it) whose weight MKL
    packed once: x @ W.T + b for float32 CPU inputs outside autograd, `F.linear` otherwise.
    It keeps the layer's own parameters under their names, so the model's state_dict is
    unchanged; the packed weight does not follow later changes to them."""

    def __init__(self, layer: nn.Linear, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias, self.relu = layer.weight, layer.bias, relu
        self.packed = _op("_mkl_reorder_linear_weight")(layer.weight.detach(), _PACK_ROWS)
        # What packed_forward hands the op, found once (like `packed`, as the weights are now).
        self._linear = _op("_mkl_linear")
        self._weight = layer.weight.detach()
        self._bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        fast = (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32 == self.weight.dtype
            and x.numel() > 0
        )
        if not fast:
            y = F.linear(x, self.weight, self.bias)
            return F.relu(y) if self.relu else y
        y = self.packed_forward(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def packed_forward(self, x: Tensor) -> Tensor:
        """forward's packed path without its checks, for x (N, in_features), N > 0, float32
        on a CPU, outside autograd: for a caller that knows these hold for every call
        (seq2seq.inference.flat)."""
        # The row count passed must be the input's: with another, the op falls back to sgemm.
        y = self._linear(x, self.packed, self._weight, self._bias, x.size(0))
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, relu={self.relu}"
        )


def use_mkl_packed_decoder(model: nn.Module, projection: bool = False) -> int:
    """Swap the linear layers of `model.decoder_layers` that run at every step (not the
    cross-attention's key/value projection, run once per batch on the encoder's output), and
    with `projection` also `model.generator`, for MklPackedLinears. Returns how many were
    swapped (0 where the ops are unusable here)."""
    if not mkl_packing_works():
        return 0
    per_step = lambda name, layer: runs_every_step(name) and float32_on_cpu(layer)  # noqa: E731
    swapped = swap_linears(model.decoder_layers, MklPackedLinear, per_step)
    gen = getattr(model, "generator", None)
    if projection and type(gen) is nn.Linear and float32_on_cpu(gen):
        model.generator = MklPackedLinear(gen)
        swapped += 1
    return swapped
