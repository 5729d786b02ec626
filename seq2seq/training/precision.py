"""Which training precision the hardware runs fast: `trainer.precision: auto`.

bfloat16 autocast pays off only where the hardware multiplies bf16 natively: NVIDIA GPUs from
Ampere on, and CPUs with AVX-512 BF16 or AMX. Elsewhere a CPU emulates it: the
Transformer-tiny recipe's float32 step ran 18x faster than bf16-mixed on a 2-core AVX2 EPYC
(README: "Benchmarks"). `auto` picks bf16-mixed where it is native and 32-true otherwise.
"""

from __future__ import annotations

import torch

from seq2seq.kernels.cpu import cpu_has_native_bf16


def resolve_precision(precision: str, accelerator: str) -> str:
    """`precision` itself, or for 'auto' bf16-mixed on hardware with native bf16, else
    32-true. `accelerator` is the recipe's ('cpu', 'gpu', 'cuda' or 'auto')."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
