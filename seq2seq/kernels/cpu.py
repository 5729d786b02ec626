"""What this CPU is, read from /proc/cpuinfo: whether bf16 arithmetic is native (AVX-512 BF16
or AMX) or emulated, which training's `precision: auto` and bench's kernel report ask, and
whether it is an Intel CPU, which decoding's choice of kernel for the output projection asks."""

from __future__ import annotations

from pathlib import Path

#: /proc/cpuinfo flags of native bf16 matrix arithmetic on x86 CPUs.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def cpu_is_intel(cpuinfo: str | None = None) -> bool:
    """Whether this is an Intel CPU (Linux: vendor_id GenuineIntel; False where unknown)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    return any(
        line.startswith("vendor_id") and line.split(":", 1)[1].strip() == "GenuineIntel"
        for line in cpuinfo.splitlines()
    )


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (Linux: its /proc/cpuinfo flags)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)
