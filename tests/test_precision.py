"""trainer.precision 'auto': bf16-mixed only where the hardware has native bf16."""

from __future__ import annotations

import seq2seq.training.precision as precision
from seq2seq.kernels.cpu import cpu_has_native_bf16

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_the_cpu_flags_name_native_bf16():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16("")


def test_auto_is_bf16_mixed_on_a_bf16_cpu_and_float32_elsewhere(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "auto") == "32-true"


def test_auto_follows_the_gpus_bf16_support_and_explicit_choices_stay(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_precision("auto", "gpu") == "32-true"
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert precision.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "32-true"  # a GPU the recipe left out
