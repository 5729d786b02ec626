"""Arguments of the decoding-side subcommands: translate, evaluate, average, bench."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from seq2seq.config import STOP_RULES

Handler = Callable[[argparse.Namespace, list[str]], int]
#: Decoding precisions (seq2seq.inference.translate.prepare_model); int8 is CPU-only dynamic quantization.
DECODE_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum` (argparse names the option)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse's message: "invalid integer value: ..."
    return parse


def add_translate(sub: argparse._SubParsersAction, handler: Handler) -> None:
    p = sub.add_parser(
        "translate",
        help="translate raw text (stdin to stdout by default)",
        description="Translate raw text, one output line per input line (blank in, blank out). "
        "Decoding defaults come from the checkpoint. With --nbest N each input line gives up to "
        "N lines 'index ||| score ||| hypothesis' (index: 0-based input line).",
    )
    p.add_argument(
        "-m",
        "--model",
        required=True,
        action="append",
        help="a run directory or a checkpoint file; repeat it for an ensemble (the models' "
        "per-step probabilities are averaged; they must share a tokenizer)",
    )
    p.add_argument("-i", "--input", default="-", help="input file, plain or .gz (default: stdin)")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, help="beam size; 1 is greedy (default: the model's)")
    p.add_argument("--nbest", type=int, help="hypotheses per sentence: 'index ||| score ||| text'")
    p.add_argument("--lenpen", type=float, help="GNMT length penalty alpha; 0 disables")
    p.add_argument("--max-len-a", type=float, help="maximum output length a * source length + b")
    p.add_argument("--max-len-b", type=int, help="maximum output length a * source length + b")
    p.add_argument("--min-len", type=int, help="minimum output length (pieces before EOS)")
    p.add_argument(
        "--stop",
        choices=STOP_RULES,
        help="end a sentence's beam search once `beam` hypotheses ended, or once its best did",
    )
    p.add_argument(
        "--max-tokens", type=int, help="source tokens per decoding batch, padding included"
    )
    p.add_argument(
        "--max-sentences",
        type=at_least(1),
        help="sentences per decoding batch at most (default: no limit)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="fp32",
        choices=DECODE_PRECISIONS,
        help="int8: dynamic quantization of the linear layers (CPU only)",
    )
    p.add_argument(
        "--pack-weights",
        "--pack-projection",
        dest="pack_weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fp32 on a CPU: pack the weights of the layers that run at every step once, the "
        "decoder layers' for MKL and the output projection's for MKL on an Intel CPU, oneDNN "
        "elsewhere (default; --no-pack-weights: torch's default kernels)",
    )
    p.add_argument(
        "--errors",
        default="strict",
        choices=["strict", "replace"],
        help="undecodable input bytes: stop with the line number, or replace them",
    )
    p.add_argument(
        "--attention",
        metavar="DIR",
        help="write a cross-attention heatmap PNG per sentence (mean over layers and heads)",
    )
    p.set_defaults(handler=handler)


def add_evaluate(sub: argparse._SubParsersAction, handler: Handler) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a translation with sacreBLEU (BLEU, chrF, TER)",
        description="Score --hyp against --ref, or translate --src with -m first. "
        "Scores equal `sacrebleu REF -i HYP -m ...`; each is printed with its signature.",
    )
    p.add_argument(
        "--hyp",
        nargs="+",
        help="hypothesis file(s), plain or .gz; several with --paired-bs or --paired-ar, the "
        "first being the baseline (or translate --src with -m)",
    )
    p.add_argument("--ref", required=True, help="reference file, plain or .gz")
    p.add_argument(
        "-m",
        "--model",
        action="append",
        help="translate --src with this model (repeat it for an ensemble), then score",
    )
    p.add_argument("--src", help="source file to translate with -m")
    p.add_argument(
        "--metrics", nargs="+", default=["bleu", "chrf"], choices=["bleu", "chrf", "ter"]
    )
    p.add_argument(
        "--lowercase",
        action="store_true",
        help="case-insensitive scores, every metric (signature case:lc; sacreBLEU's -lc for "
        "BLEU, --chrf-lowercase for chrF), as papers on Multi30k report",
    )
    p.add_argument(
        "--moses",
        metavar="LANG",
        help="papers' tokenized BLEU: both sides through Moses' normalize-punctuation and "
        "tokenizer for LANG (with --lowercase, lowercased first, as Multi30k's tok/ files), "
        "then sacreBLEU with tok:none; needs pip install -e .[papers]",
    )
    paired = p.add_mutually_exclusive_group()
    paired.add_argument(
        "--paired-bs",
        action="store_true",
        help="sacreBLEU's paired bootstrap resampling test of every --hyp against the first: "
        "scores with their mean and 95%% confidence interval, and p-values",
    )
    paired.add_argument(
        "--paired-ar",
        action="store_true",
        help="sacreBLEU's paired approximate randomization test of every --hyp against the first",
    )
    p.add_argument(
        "--paired-n",
        type=at_least(1),
        help="resamples (--paired-bs, default 1000) or trials (--paired-ar, default 10000)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="with -m: where it translates (auto)"
    )
    p.add_argument("--json", action="store_true", help="print scores and signatures as JSON")
    p.set_defaults(handler=handler)


def add_average(sub: argparse._SubParsersAction, handler: Handler) -> None:
    p = sub.add_parser(
        "average",
        help="average the parameters of several checkpoints",
        description="Average checkpoint files, or the last N by step of a run directory's "
        "checkpoints/step*-bleu*.ckpt, into one checkpoint that translates.",
    )
    p.add_argument("checkpoints", nargs="*", help="checkpoint files to average")
    p.add_argument("--run-dir", help="take checkpoints from this run directory")
    p.add_argument(
        "--last", type=at_least(1), help="with --run-dir: the last N checkpoints by step"
    )
    p.add_argument(
        "-o",
        "--output",
        help="the averaged file (default with --run-dir: checkpoints/averaged.ckpt)",
    )
    p.set_defaults(handler=handler)


#: The defaults of bench's options for timing the training step: given otherwise beside
#: `--profile` or `-m MODEL --against`, which time no training, they are refused.
TRAINING_DEFAULTS = {
    "precision": "32-true",
    "max_tokens": 4000,
    "row_tokens": None,
    "steps": 20,
    "warmup": 3,
    "compile": False,
}


def add_bench(sub: argparse._SubParsersAction, handler: Handler) -> None:
    p = sub.add_parser("bench", help="measure training and decoding speed on real Multi30k batches")
    p.add_argument("recipe", nargs="?", help="a recipe whose model shape to measure")
    p.add_argument(
        "--preset",
        help="a named shape (default: small): on Multi30k, or with a recipe on its data",
    )
    p.add_argument("-m", "--model", help="a trained model: also measure decoding")
    p.add_argument(
        "--against",
        choices=["ctranslate2", "hf"],
        help="with -m: export the model, then time its decoding beside ours; without -m (hf "
        "only): train HF's MarianMTModel of the same shape on the same batches, step by step "
        "in turn with ours (needs the export extra)",
    )
    p.add_argument(
        "--sentences",
        type=at_least(1),
        help="--against or --profile: the first N test sentences only",
    )
    p.add_argument(
        "--rounds", type=at_least(1), help="--against: timed rounds per engine (default 3)"
    )
    p.add_argument(
        "--max-sentences",
        type=at_least(1),
        help="--against or --profile: decode in batches of at most N sentences (default: the "
        "model's decode.max_tokens source tokens alone; 1: a sentence at a time)",
    )
    p.add_argument(
        "--whole-process",
        action="store_true",
        help="--against ctranslate2: time the whole commands instead, start-up and loading "
        "included: `seq2seq translate` of the test sources beside a CTranslate2 Python script",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with -m MODEL: where decoding's CPU time goes instead (torch.profiler, one "
        "thread, greedy and beam 5 over the test sentences, at most 32 of their batches taken "
        "evenly): the matrix multiplies' share and the top operators",
    )
    p.add_argument(
        "--against-compute-type",
        help="--against ctranslate2: its compute type (default float32; int8 or int8_float32 "
        "where it runs them); ours runs at --decode-precision",
    )
    p.add_argument(
        "--against-inter-threads",
        type=at_least(1),
        help="--against ctranslate2: batches it decodes side by side (its inter_threads), each "
        "on threads / N intra-op threads (default: one per thread, as ours decodes one stream "
        "per thread; 1 is CTranslate2's own default)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--precision",
        default=TRAINING_DEFAULTS["precision"],
        help="32-true, bf16-mixed, 16-mixed",
    )
    p.add_argument(
        "--max-tokens",
        type=at_least(1),
        default=TRAINING_DEFAULTS["max_tokens"],
        help="target tokens per training batch",
    )
    p.add_argument(
        "--row-tokens",
        type=at_least(1),
        help="pack each batch's pairs into rows of this many tokens (data.row_tokens)",
    )
    p.add_argument(
        "--steps",
        type=at_least(1),
        default=TRAINING_DEFAULTS["steps"],
        help="measured optimizer steps",
    )
    p.add_argument(
        "--warmup",
        type=at_least(0),
        default=TRAINING_DEFAULTS["warmup"],
        help="unmeasured warm-up steps",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (dynamic shapes); give --warmup room for its compilations",
    )
    p.add_argument(
        "--decode-precision",
        default="fp32",
        choices=DECODE_PRECISIONS,
        help="precision of the decoding measurement (with -m; ours, with --against)",
    )
    p.add_argument(
        "--stop",
        choices=STOP_RULES,
        help="beam search's stopping rule for the decoding measurement (default: the model's; "
        "with --against: ours only, the other engine's rule by default)",
    )
    p.add_argument(
        "--run-dir",
        help="where the bench's tokenizer and data caches go (default runs/bench-multi30k)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler)
