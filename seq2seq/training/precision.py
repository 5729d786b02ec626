"""Which training precision the hardware runs fast: `trainer.precision: auto`.

bfloat16 autocast pays off only where the hardware multiplies bf16 natively: NVIDIA GPUs from
Ampere on, and some CPUs with AVX-512 BF16 or AMX. A CPU without them emulates it: the
Transformer-tiny recipe's float32 step ran 18x faster than bf16-mixed on a 2-core AVX2 EPYC
(README: "Benchmarks"). The flags alone do not settle it on a CPU: float32 trains through
oneDNN's fused linear layers (`seq2seq.kernels`), bf16 autocast through torch's, and on a
2-core Xeon with AMX and AVX-512 BF16 bf16-mixed ran the default recipe's step 1.1-1.2x and
the tiny recipe's 2.2x slower than float32 (`seq2seq bench --precision P`), where a 2-core
EPYC with AVX-512 BF16 trained the default recipe 1.2x faster in it. So on a CPU with the
flags, `auto` times training passes of the recipe's own shape in both precisions
(`cpu_step_seconds`, seconds) and keeps float32 unless bf16-mixed is clearly faster.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info

from seq2seq.config import ModelConfig
from seq2seq.kernels import for_cpu_training
from seq2seq.kernels.cpu import cpu_has_native_bf16

#: bf16-mixed must run a step at least this much faster than float32 to be chosen: a tie
#: keeps float32's numerics.
BF16_MIN_SPEEDUP = 1.1
#: target tokens of the probe batch (at most the recipe's batch): enough for the matmuls to
#: reach their speed, small enough to take seconds
PROBE_TOKENS = 2048
#: rows of the probe batch have this many tokens each, about a Multi30k sentence in pieces
PROBE_LENGTH = 24


def cpu_step_seconds(cfg: ModelConfig, tokens: int = PROBE_TOKENS, rounds: int = 3) -> dict:
    """Mean seconds of one forward and backward pass (loss included, no optimizer) of a
    freshly built model of shape `cfg` on random batches of about `tokens` source and target
    tokens, with the CPU training kernels swapped in, for '32-true' and 'bf16-mixed': `rounds`
    timed passes each, alternating, after one untimed pass each. Every pass has rows of a
    length no pass before it had, as training's batches do: bf16's matmul kernels are built
    for each new shape, and on a 2-core Xeon with AMX that cost turned bf16-mixed from 1.1x
    faster than float32 on one repeated shape to 1.2x slower on changing ones."""
    from seq2seq.nn.loss import translation_loss
    from seq2seq.nn.transformer import Transformer

    generator = torch.Generator().manual_seed(0)
    model = Transformer(cfg)
    for_cpu_training(model, "cpu")
    vocab = max(min(cfg.src_vocab_size, cfg.tgt_vocab_size), 5)
    lengths = iter(range(PROBE_LENGTH - rounds - 1, PROBE_LENGTH + rounds + 1))

    def step(bf16: bool) -> float:
        length = next(lengths)
        batch = torch.randint(4, vocab, (max(tokens // length, 1), length), generator=generator)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = translation_loss(model, batch, batch, batch, 0.1).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)
    times: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    for _ in range(rounds):
        times["32-true"].append(step(False))
        times["bf16-mixed"].append(step(True))
    return {name: sum(seconds) / len(seconds) for name, seconds in times.items()}


def faster_cpu_precision(cfg: ModelConfig, max_tokens: int | None = None) -> str:
    """'bf16-mixed' where a step of shape `cfg` runs at least BF16_MIN_SPEEDUP times faster
    in it than in float32 on this CPU, else '32-true'; says which, and the times, in one line."""
    tokens = min(max_tokens or PROBE_TOKENS, PROBE_TOKENS)
    seconds = cpu_step_seconds(cfg, tokens)
    fp32, bf16 = seconds["32-true"], seconds["bf16-mixed"]
    choice = "bf16-mixed" if fp32 >= BF16_MIN_SPEEDUP * bf16 else "32-true"
    rank_zero_info(
        f"precision auto: {choice} (a {tokens}-token training step of this shape took "
        f"{fp32:.3f} s in 32-true and {bf16:.3f} s in bf16-mixed on this CPU)"
    )
    return choice


def resolve_precision(
    precision: str,
    accelerator: str,
    model: ModelConfig | None = None,
    max_tokens: int | None = None,
    processes: int = 1,
) -> str:
    """`precision` itself, or for 'auto': on a GPU, bf16-mixed where it supports bf16; on a
    CPU without native bf16, 32-true; on one with it, the faster of the two for `model`'s
    shape, timed here (`faster_cpu_precision`) when training runs in one process (`processes`)
    and `model` is given, else bf16-mixed. `accelerator` is the recipe's ('cpu', 'gpu', 'cuda'
    or 'auto')."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if not cpu_has_native_bf16():
        return "32-true"
    if model is None or processes != 1:  # several processes must agree: no timing race
        return "bf16-mixed"
    return faster_cpu_precision(model, max_tokens)
