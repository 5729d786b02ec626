"""`seq2seq bench -m MODEL --profile`: where a decode's CPU time goes, operator by operator.

The test sentences are decoded greedy and with beam 5, batch after batch on one thread (one
core's view, without the streams of `seq2seq.inference.streams`), under `torch.profiler`, in
the model's batches or in batches of at most `--max-sentences` (1: a sentence at a time), with
the model's stopping rule or `--stop`'s. Each search reports its wall time, the share of the
profiled CPU time spent in matrix multiplies (the operators in `MATMUL_OPS`, by their own time,
so nested calls count once) and the operators that took the most.

torch.profiler keeps a record of every operator call until the profile ends, and its memory
grows with the decoding steps, which grow with the number of batches: the 1,000 test sentences
one at a time took over 24 GB and were killed on a 24 GB machine (100 of them peaked at 6.8 GB).
A search therefore profiles at most `MAX_BATCHES` batches, taken evenly from all of them.
"""

from __future__ import annotations

import dataclasses
import time

from torch.profiler import ProfilerActivity, profile

from seq2seq.inference.streams import intra_op_threads
from seq2seq.inference.translate import make_batches, pad_batch
from seq2seq.inference.translator import Translator

#: The operators that multiply matrices in a decode: torch's GEMMs and the packed CPU kernels
#: of seq2seq.kernels.
MATMUL_OPS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "mkl::_mkl_linear",
    "mkldnn::_linear_pointwise",
    "quantized::linear_dynamic",
)

#: The most batches a search profiles (the module's docstring says why).
MAX_BATCHES = 32


def profile_decoding(
    translator: Translator,
    sources: list[str],
    top: int = 10,
    max_sentences: int | None = None,
    stop: str | None = None,
) -> dict:
    """Per search ('greedy', 'beam5'): seconds, matmul_share, and the `top` operators by
    their own CPU time as [name, share] pairs; shares are fractions of the profiled time.
    `max_sentences` and `stop` replace the model's decoding settings where given."""
    src_ids = translator.encode(list(sources))
    base = translator.settings(max_sentences=max_sentences, stop=stop)

    def decode(batch: list[int], cfg) -> None:
        src = pad_batch([src_ids[i] for i in batch], translator.device)
        translator.decode_batch(src, cfg, scores=False)  # as translate decodes for text

    batches = make_batches([len(s) for s in src_ids], base.max_tokens, base.max_sentences)
    if not batches:
        raise ValueError("--profile: the test sources have no non-blank line to decode")
    batches = batches[:: -(-len(batches) // MAX_BATCHES)]  # every k-th: at most MAX_BATCHES
    result: dict = {
        "profile_sentences": sum(map(len, batches)),
        "profile_batches": len(batches),
        "profile_threads": 1,
        "profile_max_sentences": base.max_sentences,
        "profile_stop": base.stop,
    }
    for name, beam in (("greedy", 1), ("beam5", 5)):
        cfg = dataclasses.replace(base, beam=beam, nbest=1)
        with intra_op_threads(1):
            decode(batches[0], cfg)  # warm-up
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for batch in batches:
                    decode(batch, cfg)
            seconds = time.perf_counter() - start
        ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(ops.values()) or 1.0
        ranked = sorted(ops.items(), key=lambda kv: kv[1], reverse=True)[:top]
        result[f"{name}_seconds"] = round(seconds, 2)
        result[f"{name}_matmul_share"] = round(
            sum(ops.get(op, 0.0) for op in MATMUL_OPS) / total, 3
        )
        result[f"{name}_top_ops"] = [[op, round(t / total, 3)] for op, t in ranked]
    return result


def profile_cli(args, data) -> int:
    """`seq2seq bench -m MODEL --profile` on `data.test` (seq2seq.config.DataConfig)."""
    import json
    import os

    from seq2seq.inference.evaluate import read_text

    if not args.model:
        raise ValueError("--profile needs -m MODEL")
    if args.device != "cpu":
        raise ValueError("--profile profiles decoding on the CPU only (--device cpu)")
    sources = read_text(os.path.join(data.root, data.test.src))[: args.sentences]
    translator = Translator.load(args.model, "cpu", args.decode_precision)
    result = profile_decoding(translator, sources, max_sentences=args.max_sentences, stop=args.stop)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    most = result["profile_max_sentences"]
    batching = "the model's batching" if most is None else f"at most {most} sentences each"
    print(
        f"decode profile: {result['profile_sentences']} of {len(sources)} sentences in "
        f"{result['profile_batches']} batches ({batching}), one thread, beam 5 stopping rule "
        f"'{result['profile_stop']}' (torch.profiler, operators' own CPU time)"
    )
    for name in ("greedy", "beam5"):
        print(
            f"  {name}: {result[f'{name}_seconds']} s, matrix multiplies "
            f"{100 * result[f'{name}_matmul_share']:.1f}%"
        )
        for op, share in result[f"{name}_top_ops"]:
            print(f"    {100 * share:5.1f}%  {op}")
    return 0
