"""Which training precision the hardware runs fast: `trainer.precision: auto`.

bfloat16 autocast pays off only where the hardware multiplies bf16 natively: NVIDIA GPUs from
Ampere on, and CPUs with AVX-512 BF16 or AMX. Elsewhere a CPU emulates it: the
Transformer-tiny recipe's float32 step ran 18x faster than bf16-mixed on a 2-core AVX2 EPYC
(README: "Benchmarks"). `auto` picks bf16-mixed where it is native and 32-true otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: /proc/cpuinfo flags of native bf16 matrix arithmetic on x86 CPUs.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (Linux: its /proc/cpuinfo flags)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, accelerator: str) -> str:
    """`precision` itself, or for 'auto' bf16-mixed on hardware with native bf16, else
    32-true. `accelerator` is the recipe's ('cpu', 'gpu', 'cuda' or 'auto')."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
