"""Swapping a model's `nn.Linear` layers (and the `nn.ReLU` right after one) from outside it:
the one loop that `onednn.use_onednn_linears` and `mkl.use_mkl_packed_decoder` share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def float32_on_cpu(layer: nn.Linear) -> bool:
    """Whether a layer's weight is float32 on a CPU: what the packed decoding kernels take."""
    return layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32


def swap_linears(
    model: nn.Module,
    make: Callable[[nn.Linear, bool], nn.Module],
    wanted: Callable[[str, nn.Linear], bool] = lambda name, layer: True,
) -> int:
    """Replace each plain `nn.Linear` in `model` for which `wanted(name, layer)` holds by
    `make(layer, relu)`. `relu` says whether an `nn.ReLU` registered right after it in the
    same parent (as the feed-forward network's activation) is fused into the new layer; that
    ReLU becomes an `nn.Identity`. Returns the number of layers replaced."""
    swapped = 0
    for parent in list(model.modules()):  # listed first: the new layers are not visited
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child) is not nn.Linear or not wanted(name, child):
                continue
            after = children[i + 1] if i + 1 < len(children) else None
            fuse = after is not None and type(after[1]) is nn.ReLU
            setattr(parent, name, make(child, fuse))
            if fuse:
                setattr(parent, after[0], nn.Identity())
            swapped += 1
    return swapped
