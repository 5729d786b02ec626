"""trainer.precision 'auto': bf16-mixed only where the hardware has native bf16 and, on a CPU,
only where a training step of the recipe's shape runs clearly faster in it."""

from __future__ import annotations

import seq2seq.training.precision as precision
from seq2seq.config import ModelConfig
from seq2seq.kernels.cpu import cpu_has_native_bf16

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_the_cpu_flags_name_native_bf16():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16("")


TINY = ModelConfig(
    d_model=16,
    n_heads=2,
    d_ff=32,
    n_encoder_layers=1,
    n_decoder_layers=1,
    src_vocab_size=40,
    tgt_vocab_size=40,
    max_positions=64,
)


def test_auto_on_a_bf16_cpu_keeps_float32_unless_bf16_steps_are_clearly_faster(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    timed = []

    def times(fp32, bf16):
        def fake(cfg, tokens):
            timed.append((cfg, tokens))
            return {"32-true": fp32, "bf16-mixed": bf16}

        return fake

    monkeypatch.setattr(precision, "cpu_step_seconds", times(1.0, 0.8))
    assert precision.resolve_precision("auto", "cpu", TINY, 8192) == "bf16-mixed"
    assert timed == [(TINY, precision.PROBE_TOKENS)]  # the probe batch: at most 2,048 tokens
    monkeypatch.setattr(precision, "cpu_step_seconds", times(1.0, 0.95))  # a tie: float32
    assert precision.resolve_precision("auto", "cpu", TINY, 1024) == "32-true"
    monkeypatch.setattr(precision, "cpu_step_seconds", times(0.8, 1.0))
    assert precision.resolve_precision("auto", "cpu", TINY, 1024) == "32-true"
    assert timed[-1] == (TINY, 1024)
    # several processes would each time their own: no race, the flags decide
    assert precision.resolve_precision("auto", "cpu", TINY, 1024, processes=2) == "bf16-mixed"
    assert len(timed) == 3


def test_the_cpu_probe_times_both_precisions_on_the_models_shape():
    seconds = precision.cpu_step_seconds(TINY, tokens=64, rounds=2)
    assert set(seconds) == {"32-true", "bf16-mixed"}
    assert all(0 < s < 60 for s in seconds.values())


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
