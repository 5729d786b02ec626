"""Translate a raw text file through CTranslate2's Python API alone: the CTranslate2 side of
`seq2seq bench -m MODEL --against ctranslate2`, run as a script of its own so that its process
imports CTranslate2 and SentencePiece, never torch or seq2seq.

    python ct2_file.py CT2_DIR IN OUT [--beam N] [--threads N] [--inter-threads N]
                       [--compute-type T]
                       [--max-tokens N | --max-sentences N] [--max-decoding-length N]
                       [--max-input-length N] [--serve]

CT2_DIR is a `seq2seq export --to ctranslate2` folder (the model, source.spm, target.spm).
One output line per input line; a blank line gives a blank line. Length penalty off, and
CTranslate2's own batching (sorted by length) and stopping rule; one length limit for every
sentence (CTranslate2's default 256; the bench gives the model's position count less one),
and over-long sources truncated (the bench: to the model's positions, EOS included, as
translate truncates them).

`--whole-process` times this script from start to exit. The decoding comparison runs it with
`--serve`: the model stays loaded and the input, read and split into pieces once, is decoded
again for every request line on stdin (`{"beam": N}`), each answered by one line on stdout,
`{"seconds": S}`, the seconds of CTranslate2's decode alone, once OUT holds its output. It
starts by printing `{"ready": true}`; with `--serve` CTranslate2 logs its CPU choices (ISA,
GEMM backend) to stderr. A process of its own keeps the two engines' thread pools apart: on a
2-core machine CTranslate2 decoded 30-40% slower in a process where torch had just run a
multi-threaded matmul (each ships its own OpenMP runtime).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: Never emitted (the export's SUPPRESS).
SUPPRESS = [["<pad>"], ["<s>"]]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra_threads (0: CTranslate2's)")
    p.add_argument(
        "--inter-threads", type=int, default=1, help="inter_threads: batches decoded side by side"
    )
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--max-sentences", type=int, help="sentences per batch, instead")
    p.add_argument("--max-decoding-length", type=int, default=256, help="tokens per output")
    p.add_argument(
        "--max-input-length", type=int, default=1024, help="source tokens kept, EOS included"
    )
    p.add_argument(
        "--serve", action="store_true", help="decode again per request line on stdin (above)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import ctranslate2
    import sentencepiece as spm

    if args.serve:
        import logging

        ctranslate2.set_log_level(logging.INFO)  # its CPU choices, as it loads
    folder = Path(args.model)
    src_sp = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    tgt_sp = spm.SentencePieceProcessor(model_file=str(folder / "target.spm"))
    translator = ctranslate2.Translator(
        str(folder),
        device="cpu",
        compute_type=args.compute_type,
        intra_threads=args.threads,
        inter_threads=args.inter_threads,
    )
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    pieces = [src_sp.encode(line, out_type=str) for line in lines]
    kept = [i for i, p in enumerate(pieces) if p]
    by_sentences = args.max_sentences is not None

    def translate(beam: int) -> float:
        """Decode the kept lines, write OUT; the seconds of the decode alone."""
        start = time.perf_counter()
        results = translator.translate_batch(
            [pieces[i] for i in kept],
            max_batch_size=args.max_sentences if by_sentences else args.max_tokens,
            batch_type="examples" if by_sentences else "tokens",
            beam_size=beam,
            length_penalty=0.0,
            max_decoding_length=args.max_decoding_length,
            max_input_length=args.max_input_length,
            suppress_sequences=SUPPRESS,
            return_scores=False,
        )
        seconds = time.perf_counter() - start
        out = [""] * len(lines)
        for i, result in zip(kept, results, strict=True):
            out[i] = tgt_sp.decode(result.hypotheses[0])
        Path(args.output).write_text("".join(line + "\n" for line in out), encoding="utf-8")
        return seconds

    if not args.serve:
        translate(args.beam)
        return 0
    print(json.dumps({"ready": True}), flush=True)
    for request in sys.stdin:
        seconds = translate(int(json.loads(request)["beam"]))
        print(json.dumps({"seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
