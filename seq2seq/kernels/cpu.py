"""What this CPU computes natively, read from its flags: whether bf16 arithmetic is native
(AVX-512 BF16 or AMX) or emulated. Training's `precision: auto` and bench's kernel report ask
the same question here."""

from __future__ import annotations

from pathlib import Path

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
