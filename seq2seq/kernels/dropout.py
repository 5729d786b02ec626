"""Dropout whose CPU mask is cut from 64-bit random words instead of drawn with `bernoulli_`.

On a CPU, `nn.Dropout` draws its mask with `bernoulli_`, which costs about twice a uniform
float draw of the same size, and a uniform float draw costs more than twice what the mask needs
(12 ms, 6.5 ms and 2.8 ms for a 3,990 x 512 mask on 2 cores; a base training step makes 32
such masks). This module fills a quarter as many 64-bit words with random bits, reads them as
16-bit lanes, and keeps a unit when its lane is at least round(p * 2^16) (read unsigned). The
keep probability is therefore 1 - p to within 2^-17, and kept units are scaled by the inverse of
that exact probability, so the expectation is the input's exactly, as with `nn.Dropout`. The
mask is kept as bytes for the backward pass. On other devices this is
`nn.functional.dropout`, whose fused kernel is already cheap.

`use_cheap_dropout(model)` swaps it in for every `nn.Dropout` of a model (training does, at
fit time); it uses public torch ops only, so it needs no fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: Values a 16-bit lane takes.
LANE_VALUES = 2**16


class Dropout(nn.Dropout):
    """`nn.Dropout` (same parameter, same `train()`/`eval()` behaviour), cheaper on a CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        dropped = round(self.p * LANE_VALUES)  # lanes below this drop their unit
        if x.device.type != "cpu" or dropped >= LANE_VALUES or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        return _CpuDropout.apply(x, dropped)


def keep_mask(shape: torch.Size, dropped: int) -> Tensor:
    """A bool mask of `shape`, True with probability 1 - dropped / 2^16, from the CPU
    generator: one 64-bit random word per four units."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits
    lanes = words.view(torch.int16)[:n]  # signed: lane value u - 2^15 for u uniform in [0, 2^16)
    return (lanes >= dropped - LANE_VALUES // 2).view(shape)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dropped: int) -> Tensor:
        keep = keep_mask(x.shape, dropped)
        ctx.save_for_backward(keep)
        ctx.scale = LANE_VALUES / (LANE_VALUES - dropped)  # 1 / P(keep)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def use_cheap_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` in `model` by `Dropout` (same p, same mode); returns
    how many were replaced."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                cheap = Dropout(child.p, child.inplace)
                cheap.train(child.training)
                setattr(parent, name, cheap)
                swapped += 1
    return swapped
