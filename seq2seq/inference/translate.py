"""`seq2seq translate`: raw text in, raw text out, one output line per input line, always.

The input streams: it is read in chunks of `CHUNK_LINES` lines; each chunk is encoded with
SentencePiece, sorted by length into token-budget batches, decoded, and written back in input
order before the next chunk is read, so a file of any size never sits in memory whole. From a
terminal or a pipe, a chunk also ends where the lines that have arrived do (`ArrivingLines`):
each line typed or written is translated and printed before the next one is waited for.

Line rules. Lines are split on "\\n" only (a trailing "\\r" is dropped), as sacreBLEU reads
them. A blank or whitespace-only line gives a blank line. A line longer than the model's
`max_positions` pieces (EOS included) is truncated, with a warning naming the line. Bytes that
are not UTF-8 stop the run with the line number, unless `errors="replace"`.

n-best output (`--nbest N`): for every input line, up to N lines

    index ||| score ||| hypothesis

best first, where index is the 0-based input line and score the length-penalized
log-probability (see seq2seq.inference.search). A blank input line gives one line `index ||| 0.0000 ||| `.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import logging
import os
import select
import stat
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from seq2seq.atomic import atomic_file
from seq2seq.config import DecodeConfig
from seq2seq.data.batching import cut
from seq2seq.inference.search import EOS, PAD, Hypothesis
from seq2seq.kernels.cpu import cpu_is_intel
from seq2seq.kernels.mkl import use_mkl_packed_decoder
from seq2seq.kernels.onednn import use_packed_bf16_decoder, use_packed_projection
from seq2seq.kernels.swap import relu_in_place
from seq2seq.nn.transformer import Transformer

log = logging.getLogger(__name__)

CHUNK_LINES = 10_000
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InputError(ValueError):
    """An input line that cannot be read; the message names the file and the line."""


# --- Reading and writing lines ---------------------------------------------------------------
#: Names of this process's standard streams, used as they are ("-") rather than opened
#: again: reopening /dev/stdout when it is a file truncates it, even one the shell opened
#: with >> to append.
_STANDARD = {
    "r": ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"),
    "w": ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"),
}


def open_binary(path: str, mode: str, stack: ExitStack) -> BinaryIO:
    """'-' is stdin/stdout; a name ending in .gz is gzip; else a plain file. A file opened for
    writing is written under a temporary name and takes `path` only once complete (see
    seq2seq.atomic): a failed or killed run leaves no file that looks finished, and an existing
    `path` untouched."""
    if path in _STANDARD.get(mode[0], ()):
        path = "-"
    if path == "-":
        reading = "r" in mode
        stream = sys.stdin if reading else sys.stdout
        if stream is None:  # closed by the caller (`<&-`, `>&-`): Python gives None
            raise ValueError(
                "standard input is closed: pipe text in, or give -i FILE"
                if reading
                else "standard output is closed: give -o FILE"
            )
        return stream.buffer
    if "r" in mode:
        raw = stack.enter_context(open(path, mode))  # noqa: SIM115 (the stack closes it)
    else:
        raw = stack.enter_context(atomic_file(path, mode))
    return stack.enter_context(gzip.open(raw, mode)) if path.endswith(".gz") else raw


def check_not_same_file(input_path: str, output_path: str) -> None:
    """Refuse to write the output over the input: the same path, a link or a hard link to it,
    or the file behind a redirected standard input or output ("-")."""
    source, target = _file_identity(input_path, sys.stdin), _file_identity(output_path, sys.stdout)
    if source is None or source != target:
        return
    if "-" not in (input_path, output_path):
        what = f"-o {output_path} is the input file {input_path}"
    elif output_path != "-":
        what = f"-o {output_path} is the file standard input reads"
    elif input_path != "-":
        what = f"standard output goes to the input file {input_path}"
    else:
        what = "standard output goes to the file standard input reads"
    raise ValueError(f"{what}; write the translation elsewhere")


def _file_identity(path: str, stream: IO | None) -> tuple[int, int] | None:
    """(device, inode) of the regular file at `path`, or behind `stream` for "-"; None for
    anything else (a terminal, a pipe, a missing file)."""
    try:
        found = os.fstat(stream.fileno()) if path == "-" else os.stat(path)
    except (AttributeError, OSError, ValueError):  # no stream, no fileno, no such file
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISREG(found.st_mode) else None


def read_lines(stream: Iterable[bytes], name: str, errors: str = "strict") -> Iterator[str]:
    """Decode UTF-8 lines split on b"\\n", without the line ending.

    Raises:
        InputError: invalid UTF-8 with errors="strict", naming `name` and the 1-based line.
    """
    lineno = 0
    try:
        for lineno, raw in enumerate(stream, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                yield raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{name}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start}); "
                    "use --errors replace to substitute U+FFFD"
                ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        where = f"{name}:{lineno + 1}" if lineno else name
        raise InputError(f"{where}: not a readable gzip file ({err})") from None


def chunked(
    lines: Iterable[str], size: int, ready: Callable[[], bool] | None = None
) -> Iterator[list[str]]:
    """Lists of `size` lines (the last may be shorter); with `ready`, a list also ends when
    `ready()` says the next line has not arrived yet."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size or (ready is not None and not ready()):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ArrivingLines:
    """The lines (bytes, each with its b"\\n") of a pipe or terminal, read from its file
    descriptor as they arrive, and `ready()`: whether the next line, or the end, is already
    there. A command reading a file waits for 10,000 lines or the end before it translates;
    from a person typing, or a program writing a line and waiting for its translation, the
    lines that have arrived are translated at once."""

    def __init__(self, fd: int):
        self.fd, self.eof = fd, False
        self.lines: deque[bytes] = deque()
        self.partial: list[bytes] = []  # the start of a line whose end has not arrived

    def __iter__(self) -> ArrivingLines:
        return self

    def __next__(self) -> bytes:
        while not self.lines:
            if self.eof:
                raise StopIteration
            self._read()
        return self.lines.popleft()

    def ready(self) -> bool:
        """Whether the next line (or the end) can be had without waiting for the writer: what
        has arrived is read, without blocking."""
        while not (self.lines or self.eof):
            if not select.select([self.fd], [], [], 0)[0]:
                return False
            self._read()
        return True

    def _read(self) -> None:
        """One read of what the descriptor holds (it waits only when nothing has arrived)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.eof = True
            if self.partial:
                self.lines.append(b"".join(self.partial))
            return
        *complete, rest = data.split(b"\n")
        if complete:
            self.lines.append(b"".join([*self.partial, complete[0], b"\n"]))
            self.lines.extend(line + b"\n" for line in complete[1:])
            self.partial = []
        if rest:
            self.partial.append(rest)


def arriving_lines(stream: BinaryIO) -> ArrivingLines | None:
    """An ArrivingLines of `stream`, just opened, where it is a pipe or terminal (stdin, a
    FIFO, /dev/stdin), else None: a regular file has every line there already, a .gz file is
    read through gzip, and Windows' `select` takes sockets only."""
    if os.name == "nt" or not isinstance(stream, io.BufferedReader):
        return None
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # replaced by something without a descriptor (tests)
        return None
    return None if stat.S_ISREG(os.fstat(fd).st_mode) else ArrivingLines(fd)


def one_line(text: str) -> str:
    """Whatever the model writes stays on one line (no newline-like characters)."""
    return " ".join(text.splitlines())


# --- Encoding and batching ------------------------------------------------------------------
def encode_lines(
    tokenizer, lines: list[str], max_positions: int, name: str = "<input>", first: int = 1
) -> list[list[int]]:
    """Source ids (pieces + EOS) per line; [] for a blank line; over-long lines truncated.

    A line SentencePiece makes no pieces of (only invisible characters: U+FEFF, U+200B, a
    control character) is blank too: decoded from EOS alone, the model would invent a
    sentence where a blank line gives a blank line.

    `first` is the 1-based number of lines[0] in the input, for the warnings.
    """
    blank = [not line.strip() for line in lines]
    ids = tokenizer.encode_src([line for line, b in zip(lines, blank, strict=True) if not b])
    out, it = [], iter(ids)
    for i, is_blank in enumerate(blank):
        seq = [] if is_blank else next(it)
        if seq == [EOS]:  # no pieces
            seq = []
        if len(seq) > max_positions:
            log.warning(
                "%s:%d: %d pieces exceed the model's max_positions=%d; truncated",
                name,
                first + i,
                len(seq),
                max_positions,
            )
            seq = seq[: max_positions - 1] + [EOS]
        out.append(seq)
    return out


def make_batches(
    lengths: list[int], max_tokens: int, max_sentences: int | None = None, streams: int = 1
) -> list[list[int]]:
    """Indices sorted by length, cut by the training batch cutter so that sentences x longest
    <= max_tokens (padding included), and into pieces of at most `max_sentences`; zero lengths
    (blank lines) are left out; a longer sentence gets a batch alone.

    For `streams` > 1 streams decoding the batches side by side (seq2seq.inference.streams),
    the batches are as many as that budget needs, rounded up to a multiple of `streams`, and
    as even as a budget can make them (the smallest budget that needs no more): the streams
    then end together, instead of one decoding a last, smaller batch alone (the 1,000
    test_2016_flickr sentences in 4,096 tokens: 5 batches, the last of 1,504 tokens; for 2
    streams 6 of 2,923-2,944). They come longest sentences first: of batches with as many
    tokens, those take the most steps and the longest, and taken first (the streams take the
    next batch as they get free) they leave the quickest for last, so that the streams end
    closer together (the default recipe's greedy decode of those sentences 2.6% faster on a
    2-core Xeon than with the batches of the most tokens first; beam 5 the same). A single
    batch becomes `streams` batches."""
    source = np.asarray(lengths, dtype=np.int64)
    order = np.flatnonzero(source > 0)
    order = order[np.argsort(source[order], kind="stable")]
    no_target = np.zeros_like(source)

    def batches_of(budget: int) -> list[list[int]]:
        batches = [b.tolist() for b in cut(order, source, no_target, budget)]
        if max_sentences is None:
            return batches
        return [b[i : i + max_sentences] for b in batches for i in range(0, len(b), max_sentences)]

    batches = batches_of(max_tokens)
    if streams <= 1 or order.size < streams:
        return batches
    want = -(-len(batches) // streams) * streams
    low, high = 1, max_tokens  # the smallest budget that needs at most `want` batches
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(batches_of(mid)) <= want else (mid + 1, high)
    batches = batches_of(low)
    return sorted(batches, key=lambda b: (int(source[b].max()), len(b)), reverse=True)


def pad_batch(seqs: list[list[int]], device: torch.device) -> Tensor:
    """Right-pad with 0 into a (B, S) long tensor."""
    out = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq)
    return out.to(device)


@dataclass
class Translation:
    """One input line and its hypotheses (none for a blank line)."""

    index: int
    """0-based input line."""
    line: str
    src_ids: list[int]
    hypotheses: list[Hypothesis]


# --- Translating ------------------------------------------------------------------------------
def format_output(tokenizer, hyps: list[Hypothesis], index: int, nbest: bool) -> list[str]:
    """The output line(s) of input line `index` (0-based): the best text, or n-best lines."""
    texts = [one_line(tokenizer.decode_tgt(h.tokens)) for h in hyps]
    if not nbest:
        return [texts[0] if texts else ""]
    if not hyps:
        return [f"{index} ||| {0.0:.4f} ||| "]
    return [f"{index} ||| {h.score:.4f} ||| {t}" for h, t in zip(hyps, texts, strict=True)]


def check_cuda_device(device: str | torch.device) -> None:
    """Refuse a CUDA device (cuda, cuda:N) where torch sees none, in one line."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")


def prepare_model(
    model: Transformer, device: str, precision: str, pack_weights: bool = True
) -> Transformer:
    """Move to `device` ('auto': cuda when available, the CPU for int8) and cast or quantize
    to `precision`.

    int8 is torch's dynamic quantization of the nn.Linear layers (CPU only), the output
    projection (`generator`) included, of a copy of the model; the embeddings stay in float32.
    With `pack_weights`, in float32 on a CPU, layers that run at every decoding step are
    swapped, in place, for copies whose weights are packed once: the decoder layers' for MKL
    (`seq2seq.kernels.mkl.use_mkl_packed_decoder`), the output projection's for MKL on an
    Intel CPU and for oneDNN elsewhere (`seq2seq.kernels.onednn.use_packed_projection`); in
    bf16 on a CPU, the same layers for oneDNN at bucketed row counts
    (`seq2seq.kernels.onednn.use_packed_bf16_decoder`). Its ReLUs overwrite their input
    (`seq2seq.kernels.swap.relu_in_place`). The model is for decoding from then on.
    """
    if precision not in (*PRECISIONS, "int8"):
        raise ValueError(f"precision={precision!r}: choose from {', '.join(PRECISIONS)}, int8")
    if device != "auto" and str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose from auto, cpu, cuda (or cuda:N)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and precision != "int8" else "cpu"
    check_cuda_device(device)
    if precision == "int8" and device != "cpu":
        raise ValueError("--precision int8 runs on the CPU only (use --device cpu)")
    # Deprecated since torch 2.10 in favour of the torchao package, and due to go.
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if precision == "int8" and quantize_dynamic is None:
        raise ValueError(
            f"--precision int8 needs torch.ao.quantization.quantize_dynamic, which torch "
            f"{torch.__version__} no longer has; use --precision fp32 or an earlier torch"
        )
    model = model.to(device).eval()
    if precision == "int8":
        with warnings.catch_warnings():  # torch.ao's deprecation notices: stderr stays quiet
            warnings.simplefilter("ignore")
            model = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    else:
        model = model.to(PRECISIONS[precision])
    relu_in_place(model)
    if pack_weights and precision == "fp32":
        # The projection on MKL too where that was measured faster (an Intel Xeon: beam 5 by
        # 10-14%); elsewhere on oneDNN (AMD EPYCs: faster than MKL's F.linear).
        use_mkl_packed_decoder(model, projection=cpu_is_intel())
        if type(model.generator) is nn.Linear:
            use_packed_projection(model)
    if pack_weights and precision == "bf16":
        use_packed_bf16_decoder(model)
    return model


def check_lengths(cfg: DecodeConfig, max_positions: int) -> None:
    """Refuse a minimum length no output can reach: the model writes at most max_positions - 1
    tokens before EOS. (A line whose a * |x| + b is below min_len gets min_len as its
    maximum: see search.max_output_lengths.)"""
    if cfg.min_len > max_positions - 1:
        raise ValueError(
            f"--min-len {cfg.min_len} exceeds the longest output this model can write "
            f"({max_positions - 1} tokens: max_positions={max_positions})"
        )


def decode_settings(translator, args: argparse.Namespace) -> DecodeConfig:
    """The checkpoint's decoding defaults, with the options given on the command line."""
    return translator.settings(
        beam=args.beam,
        nbest=args.nbest,
        lenpen=args.lenpen,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        min_len=args.min_len,
        max_tokens=args.max_tokens,
        max_sentences=args.max_sentences,
        stop=args.stop,
    )


def translate_stream(
    translator,
    lines: Iterable[str],
    cfg: DecodeConfig,
    name: str = "<input>",
    progress=None,
    ready: Callable[[], bool] | None = None,
) -> Iterator[list[Translation]]:
    """Every input line's translation by a seq2seq.inference.translator.Translator, in order,
    one chunk of `CHUNK_LINES` lines at a time (or of the lines arrived: `chunked`'s `ready`)."""
    start = 0
    for chunk in chunked(lines, CHUNK_LINES, ready):
        src_ids = translator.encode(chunk, name, start + 1)
        # Scores are printed with n-best output only (`format_output`).
        hyps = translator.translate_ids(src_ids, cfg, progress, scores=cfg.nbest > 1)
        yield [
            Translation(start + i, *parts)
            for i, parts in enumerate(zip(chunk, src_ids, hyps, strict=True))
        ]
        start += len(chunk)


def progress_bar(typed: bool = False):
    """A tqdm progress bar of sentences on stderr, drawn on a terminal only (and not while a
    person types the input there: `typed`), and without tqdm's monitor thread: decoding forks
    its streams only where no other Python thread runs (seq2seq.inference.streams.can_fork)."""
    from tqdm import tqdm

    class Progress(tqdm):
        monitor_interval = 0

    return Progress(unit=" sent", file=sys.stderr, disable=True if typed else None)


def translate_cli(args: argparse.Namespace) -> int:
    """The `seq2seq translate` command (arguments: seq2seq.cli.decode.add_translate); several
    -m models decode as an ensemble."""
    from seq2seq.inference.translator import Translator

    check_not_same_file(args.input, args.output)
    if args.attention and len(args.model) > 1:
        raise ValueError("--attention draws one model's cross-attention: give a single -m")
    if args.attention and os.path.exists(args.attention) and not os.path.isdir(args.attention):
        raise ValueError(f"--attention {args.attention}: exists and is not a folder")
    with ExitStack() as stack:
        # A missing input or an output folder that does not exist fails before any loading.
        source = open_binary(args.input, "rb", stack)
        out = open_binary(args.output, "wb", stack)
        translator = Translator.load(args.model, args.device, args.precision, args.pack_weights)
        cfg = decode_settings(translator, args)
        name = "<stdin>" if args.input == "-" else args.input
        paths = " + ".join(map(str, translator.paths))
        log.info("%s: beam %d, nbest %d, lenpen %g", paths, cfg.beam, cfg.nbest, cfg.lenpen)
        arriving = arriving_lines(source)
        progress = stack.enter_context(progress_bar(arriving is not None and source.isatty()))
        lines = read_lines(source if arriving is None else arriving, name, args.errors)
        ready = None if arriving is None else arriving.ready
        for chunk in translate_stream(translator, lines, cfg, name, progress, ready):
            for t in chunk:
                text = format_output(translator.tokenizer, t.hypotheses, t.index, cfg.nbest > 1)
                out.write(("\n".join(text) + "\n").encode("utf-8"))
            out.flush()
            if args.attention:
                _write_attention(
                    translator.models[0], translator.tokenizer, chunk, Path(args.attention)
                )
    return 0


def _write_attention(model, tokenizer, chunk: list[Translation], folder: Path) -> None:
    from seq2seq.inference.attention import save_heatmap

    for t in chunk:
        if t.hypotheses:
            path = folder / f"line{t.index + 1:07d}.png"
            save_heatmap(model, tokenizer, t.line, t.src_ids, t.hypotheses[0].tokens, path)
