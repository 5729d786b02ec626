"""Speed tricks, swapped into a plain Transformer from outside it: `for_cpu_training` here at
fit time, `mkl.use_mkl_packed_decoder` and `onednn.use_packed_projection` at load time. The
model file calls its own `nn.Linear`, `nn.ReLU` and `nn.Dropout`; these modules put faster
equivalents in their place, each falling back to the plain layer (with one warning where the
private torch op it needs has changed) when that op is missing or wrong."""

from __future__ import annotations

import torch
from torch import nn

from seq2seq.kernels.dropout import use_cheap_dropout
from seq2seq.kernels.onednn import use_onednn_linears


def for_cpu_training(model: nn.Module, device: torch.device | str) -> list[str]:
    """Swap the CPU training kernels into `model` when it trains on a CPU: dropout masks cut
    from random words, and linear layers through oneDNN (bias and ReLU fused). On other
    devices nothing changes (their own kernels are already fused). Returns what was swapped,
    e.g. ["dropout x 21", "onednn linear x 37"]."""
    if torch.device(device).type != "cpu":
        return []
    done = []
    if n := use_cheap_dropout(model):
        done.append(f"dropout x {n}")
    if n := use_onednn_linears(model):
        done.append(f"onednn linear x {n}")
    return done
