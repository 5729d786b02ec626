"""Decoding with the exported models beside ours: the engines (`hf_translate`,
`ct2_translate`) that the parity tests use, and `seq2seq bench --against`'s timing (`compare`).

Matched settings, for parity. Every engine gets our source ids (pieces + EOS, over-long lines
truncated as `translate` truncates them) in our batches (by length, `max_tokens` padded source
tokens each), never emits <pad> or <s>, and stops a sentence at EOS or at our limit of
floor(a * |x| + b) tokens. Hugging Face's generate takes a logits processor, through which
each sentence gets its own limit. CTranslate2's limit is one number per call: with
`exact=True` (parity) each batch holds sentences of one limit, otherwise a batch gets its
largest (a sentence that would have hit its own limit can then run a little longer).
Length penalties differ in form (ours GNMT's ((5 + |y|) / 6)^alpha, theirs |y|^alpha): the
comparison runs all engines with the penalty off. Beam search ends a sentence by the other
engine's rule: CTranslate2 once its best hypothesis has ended (our stop='best'), Hugging Face
with early_stopping once `beam` hypotheses have (our stop='beam').

The speed comparison (`compare`) runs CTranslate2 as a user would, apart from torch: in a
process of its own, in its own batches (seq2seq.export.processes)."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch

from seq2seq.config import DecodeConfig
from seq2seq.constants import EOS_ID, PAD_ID
from seq2seq.inference.checkpoint import LoadedModel, load_model
from seq2seq.inference.search import max_output_lengths
from seq2seq.inference.streams import cpu_streams, stream_kind
from seq2seq.inference.translate import encode_lines, make_batches, one_line
from seq2seq.inference.translator import Translator
from seq2seq.kernels.mkl import MklPackedLinear
from seq2seq.kernels.onednn import PackedLinear

#: `--against`: the engines, and the stopping rule of ours that matches each.
ENGINES = {"ctranslate2": "best", "hf": "beam"}


def source_ids(loaded: LoadedModel, lines: list[str]) -> list[list[int]]:
    """Our encoder input per line, as `translate` makes it."""
    return encode_lines(loaded.tokenizer, lines, loaded.model.cfg.max_positions)


def output_limits(src_ids: list[list[int]], cfg: DecodeConfig, max_positions: int) -> list[int]:
    """Our per-sentence token limit (EOS not counted): search.max_output_lengths'."""
    limits = []
    for ids in src_ids:
        src = torch.tensor([ids or [PAD_ID]])
        limits.append(int(max_output_lengths(src, cfg, max_positions)[0]))
    return limits


def our_batches(lengths: list[int], max_tokens: int, max_sentences: int | None) -> list[list[int]]:
    """The batches our Translator decodes these sources in on this CPU (its streams' even
    cut), which the other engines get too."""
    streams = cpu_streams(torch.device("cpu"), len(lengths))
    return make_batches(lengths, max_tokens, max_sentences, streams)


def _batches(
    src_ids: list[list[int]],
    limits: list[int],
    max_tokens: int,
    exact: bool,
    max_sentences: int | None = None,
) -> list[tuple[int, list[int]]]:
    """(limit, sentence indices) per engine call: our batches (`our_batches`: by
    length, `max_tokens` padded source tokens and at most `max_sentences` each), with the
    batch's largest limit; with `exact`, cut within groups of equal limits instead."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, limit in enumerate(limits):
        groups[limit if exact else 0].append(i)
    calls = []
    for group in groups.values():
        for batch in our_batches([len(src_ids[i]) for i in group], max_tokens, max_sentences):
            indices = [group[j] for j in batch]
            calls.append((max(limits[i] for i in indices), indices))
    return calls


def hf_translate(
    model,
    tokenizer,
    src_ids: list[list[int]],
    limits: list[int],
    beam: int,
    max_tokens: int,
    min_len: int = 1,
    max_sentences: int | None = None,
) -> list[str]:
    """Marian's `generate` on our ids, in our batches (`our_batches`): the best
    hypothesis per sentence, decoded by the MarianTokenizer (length penalty off;
    early_stopping: a sentence ends once `beam` hypotheses have). Each sentence stops at its
    own limit (`_EosAtLimit`), so this is exact, not only for parity."""
    # Keywords, not a GenerationConfig: transformers 4.x replaces a passed config's values
    # that equal the library defaults (num_beams=1) by the model's own.
    settings = {
        "num_beams": beam,
        "num_return_sequences": 1,
        "do_sample": False,
        "max_length": None,
        "min_length": min_len + 1,  # HF counts the start token
        "forced_eos_token_id": None,
        # Greedy search takes neither: the library defaults (else a warning names them).
        "length_penalty": 0.0 if beam > 1 else 1.0,
        "early_stopping": beam > 1,
    }
    out = [""] * len(src_ids)
    for batch in our_batches([len(s) for s in src_ids], max_tokens, max_sentences):
        rows = [src_ids[i] for i in batch]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        limit = torch.tensor([limits[i] for i in batch])
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=ids != PAD_ID,
                max_new_tokens=int(limit.max()) + 1,  # the last one EOS, forced
                **settings,
                logits_processor=_eos_at_limit(limit.repeat_interleave(beam)),
            )
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            out[i] = one_line(text)
    return out


def _eos_at_limit(limit: torch.Tensor):
    """Our rule at the length limit: after `limit[row]` tokens only EOS, scored by its own
    log-probability. (Marian's forced_eos_token_id scores it 0, log 1, instead, at one length
    for the whole batch: beam search then ranks hypotheses that hit the limit higher than we
    do.) Rows are sentence-major, `beam` per sentence, as generate lays them out."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class EosAtLimit(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            done = input_ids.size(1) - 1 >= limit  # (rows,): the start token + tokens so far
            if bool(done.any()):
                eos, scores = scores[done, EOS_ID], scores.clone()
                scores[done] = -math.inf
                scores[done, EOS_ID] = eos
            return scores

    return LogitsProcessorList([EosAtLimit()])


def ct2_translate(
    translator,
    tokenizer,
    src_ids: list[list[int]],
    limits: list[int],
    beam: int,
    max_tokens: int,
    exact: bool = True,
    min_len: int = 1,
    max_sentences: int | None = None,
) -> list[str]:
    """`ctranslate2.Translator.translate_batch` on our pieces (the model appends EOS), in our
    batches (`_batches`); the best hypothesis per sentence, detokenized by our tokenizer."""
    from seq2seq.export.ct2 import SUPPRESS, tokenizer_pieces

    pieces, tgt_pieces = tokenizer_pieces(tokenizer)
    tgt_id = {p: i for i, p in enumerate(tgt_pieces)}
    out = [""] * len(src_ids)
    for limit, batch in _batches(src_ids, limits, max_tokens, exact, max_sentences):
        results = translator.translate_batch(
            [[pieces[t] for t in src_ids[i][:-1]] for i in batch],
            beam_size=beam,
            length_penalty=0.0,
            max_decoding_length=limit,
            min_decoding_length=min_len,
            suppress_sequences=SUPPRESS,
            return_scores=False,
        )
        for i, result in zip(batch, results, strict=True):
            ids = [tgt_id[p] for p in result.hypotheses[0]]
            out[i] = one_line(tokenizer.decode_tgt(ids))
    return out


class _Ours:
    """Our decode of the ids on the CPU, prepared as `seq2seq translate --precision P` prepares
    it."""

    def __init__(self, loaded: LoadedModel, src_ids, cfg: DecodeConfig, precision: str = "fp32"):
        self.translator = Translator.of([loaded], "cpu", precision)
        self.src_ids, self.cfg = src_ids, cfg

    def __call__(self, beam: int) -> tuple[float, list[str]]:
        """The seconds of the search alone (as the other engines time theirs) and the lines."""
        cfg = dataclasses.replace(self.cfg, beam=beam, nbest=1)
        start = time.perf_counter()
        # Text alone, as CTranslate2 is asked (return_scores=False).
        hyps = self.translator.translate_ids(self.src_ids, cfg, scores=False)
        seconds = time.perf_counter() - start
        return seconds, [self.translator.text(h[0]) if h else "" for h in hyps]


def _torch_gemm() -> str:
    """What torch's float32 CPU linear layers run on."""
    return "MKL" if torch.backends.mkl.is_available() else "torch's CPU GEMM"


def ours_kernels(translator: Translator, precision: str = "fp32") -> str:
    """The CPU kernels our decode runs at `precision` (seq2seq.kernels.onednn for float32)."""
    if precision == "bf16":
        from seq2seq.kernels.cpu import cpu_has_native_bf16

        packed = isinstance(translator.models[0].generator, PackedLinear)
        where = "; decoder layers and output projection packed, row-bucketed" if packed else ""
        if cpu_has_native_bf16():
            return f"bf16 linear layers: oneDNN (the CPU has native bf16){where}"
        return f"bf16 linear layers: emulated (no AVX-512 BF16 or AMX on this CPU: slow){where}"
    if precision == "int8":
        return f"int8 linear layers: torch dynamic quantization ({torch.backends.quantized.engine})"
    model = translator.models[0]
    said = []
    if isinstance(model.generator, PackedLinear):
        said.append("output projection: oneDNN, packed, row-bucketed")
    if isinstance(model.generator, MklPackedLinear):
        said.append("output projection: MKL, packed")
    if any(isinstance(m, MklPackedLinear) for m in model.decoder_layers.modules()):
        said.append("decoder layers: MKL, packed")
    rest = "other linear layers" if said else "linear layers"
    return "; ".join([*said, f"{rest}: {_torch_gemm()}"])


def _theirs(
    against: str,
    folder: Path,
    loaded: LoadedModel,
    sources: list[str],
    src_ids,
    limits,
    cfg,
    threads,
    compute_type,
    stack: ExitStack,
    inter_threads: int | None = None,
):
    """A function beam -> (decode seconds, texts) running the exported model in `folder`, and
    the CPU kernels that engine runs. Hugging Face decodes in this process, in our batches;
    CTranslate2 at `compute_type` in a process of its own (`processes.Ct2Worker`, closed by
    `stack`), on the raw `sources`, in its own batches, `inter_threads` of them side by side
    (`processes.ct2_threads`)."""
    if against == "hf":
        from transformers import MarianMTModel, MarianTokenizer

        model = MarianMTModel.from_pretrained(str(folder)).eval()
        tok = MarianTokenizer.from_pretrained(str(folder))

        def run(beam: int) -> tuple[float, list[str]]:
            start = time.perf_counter()
            texts = hf_translate(
                model, tok, src_ids, limits, beam, cfg.max_tokens, cfg.min_len, cfg.max_sentences
            )
            return time.perf_counter() - start, texts

        return run, f"linear layers: {_torch_gemm()}"
    from seq2seq.export.processes import Ct2Worker, ct2_file_args

    args = ct2_file_args(loaded, threads, compute_type, cfg.max_sentences, inter_threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    worker = stack.enter_context(Ct2Worker(folder, sources, folder.parent, args, env))
    return worker, worker.kernels(compute_type) or "not logged"


def compare(
    model_path: str,
    against: str,
    sources: list[str],
    refs: list[str],
    rounds: int = 3,
    max_sentences: int | None = None,
    precision: str = "fp32",
    compute_type: str = "float32",
    stop: str | None = None,
    inter_threads: int | None = None,
) -> dict:
    """Export `model_path` to a temporary folder, then decode `sources` greedy and beam 5 with
    ours and the other engine, alternating rounds (ours, theirs, ours, ...), each timing its
    search alone (tokenizing and detokenizing left out); sentences/s is each engine's median
    over `rounds`, BLEU that of its output. On the CPU, ours at `precision` (translate's
    --precision) in translate's batches of `decode.max_tokens` source tokens (or at most
    `max_sentences` sentences); CTranslate2 at `compute_type`, in a process of its own
    (`processes.Ct2Worker`: in one process with torch's thread pool it ran 30-40% slower), in
    its own batches of as many tokens (or sentences); Hugging Face in float32, in this process
    and our batches. All on torch's thread count: ours one stream per thread, CTranslate2
    `inter_threads` batches side by side (None: as many as ours). Beam search stops by the
    other engine's rule in both, or by `stop` in ours."""
    from seq2seq.export import export
    from seq2seq.export.processes import ct2_length_limit, ct2_threading

    if against not in ENGINES:
        raise ValueError(f"--against {against}: choose from {', '.join(ENGINES)}")
    loaded = load_model(model_path)  # ours decodes it as translate does (_Ours)
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(
        loaded.decode, lenpen=0.0, stop=ENGINES[against], max_sentences=max_sentences
    )
    ours_cfg = cfg if stop is None else dataclasses.replace(cfg, stop=stop)
    src_ids = source_ids(loaded, sources)
    limits = output_limits(src_ids, cfg, loaded.model.cfg.max_positions)
    batches = f"batches of {cfg.max_tokens} source tokens" + (
        "" if max_sentences is None else f" and at most {max_sentences} sentences"
    )
    if against == "hf":
        theirs_setting = f"hf float32 in this process, torch threads={threads}, our {batches}"
        limit_setting = "length limit a*|x|+b per sentence"
    else:
        own = f"{cfg.max_tokens} tokens" if max_sentences is None else f"{max_sentences} sentences"
        theirs_setting = (
            f"ctranslate2 {compute_type} in a process of its own (ct2_file.py --serve), "
            f"{ct2_threading(threads, inter_threads)}, its own batches of {own}"
        )
        limit_setting = (
            "length limit a*|x|+b per sentence for ours, "
            f"{ct2_length_limit(loaded)} for ctranslate2"
        )
    result: dict = {
        "against": against,
        "sentences": len(sources),
        "rounds": rounds,
        "threads": threads,
        "settings": (
            f"on the CPU, decoding alone; ours {precision}, torch threads={threads}, translate's "
            f"{batches}, one stream per thread ({stream_kind()}); {theirs_setting}; "
            "length penalty off; "
            + (
                f"beam stop rule '{cfg.stop}'"
                if ours_cfg.stop == cfg.stop
                else f"beam stop rule '{ours_cfg.stop}' for ours, {against}'s own for it"
            )
            + f"; {limit_setting}"
        ),
    }
    with tempfile.TemporaryDirectory(prefix="seq2seq-bench-") as tmp, ExitStack() as stack:
        folder = Path(tmp) / against
        export(model_path, against, folder)
        ours = _Ours(loaded, src_ids, ours_cfg, precision)
        theirs, their_kernels = _theirs(
            against,
            folder,
            loaded,
            sources,
            src_ids,
            limits,
            cfg,
            threads,
            compute_type,
            stack,
            inter_threads,
        )
        engines = {"ours": ours, against: theirs}
        result["ours_kernels"] = ours_kernels(ours.translator, precision)
        result[f"{against}_kernels"] = their_kernels
        for name, beam in (("greedy", 1), ("beam5", 5)):
            times: dict[str, list[float]] = {k: [] for k in engines}
            texts: dict[str, list[str]] = {}
            for run in engines.values():  # warm-up, unmeasured
                run(beam)
            for _ in range(rounds):
                for k, run in engines.items():
                    seconds, texts[k] = run(beam)
                    times[k].append(seconds)
            result.update(search_figures(name, against, times, texts, refs))
    return result


def search_figures(
    name: str,
    against: str,
    seconds: dict[str, list[float]],
    texts: dict[str, list[str]],
    refs: list[str],
) -> dict:
    """One search's figures for bench --against: per engine ('ours', `against`) sentences/s
    (its `texts`' lines over the median of its timed `seconds`) and BLEU of its `texts`, their speed ratio, and
    how many lines both wrote alike."""
    from seq2seq.inference.evaluate import score

    out: dict = {}
    for k in ("ours", against):
        speed = len(texts[k]) / statistics.median(seconds[k])
        out[f"{name}_{k}_sentences_per_s"] = round(speed, 1)
        out[f"{name}_{k}_bleu"] = round(score(texts[k], refs, ["bleu"])["bleu"], 2)
    out[f"{name}_ratio_ours_over_{against}"] = round(
        out[f"{name}_ours_sentences_per_s"] / out[f"{name}_{against}_sentences_per_s"], 3
    )
    out[f"{name}_identical_lines"] = sum(
        a == b for a, b in zip(texts["ours"], texts[against], strict=True)
    )
    return out


def _ct2_compute_types() -> set[str]:
    """The compute types CTranslate2 runs on this CPU (its export extra, checked first)."""
    from seq2seq.export import require

    return set(require("ctranslate2").get_supported_compute_types("cpu"))


def compare_cli(args, data) -> int:
    """`seq2seq bench -m MODEL --against ENGINE` on `data.test` (seq2seq.config.DataConfig)."""
    import json
    import os

    from seq2seq.inference.evaluate import read_text

    if not args.model:
        raise ValueError("--against needs -m MODEL")
    if args.device != "cpu":
        raise ValueError("--against compares decoding on the CPU only (--device cpu)")
    if args.whole_process and args.against != "ctranslate2":
        raise ValueError("--whole-process compares with --against ctranslate2 only")
    if args.decode_precision not in ("fp32", "bf16", "int8"):
        raise ValueError(
            f"--against --decode-precision {args.decode_precision}: choose fp32, bf16 or int8"
        )
    compute_type = args.against_compute_type or "float32"
    if args.against == "hf" and (args.decode_precision != "fp32" or compute_type != "float32"):
        raise ValueError(
            "--against hf compares float32 only (--decode-precision and --against-compute-type "
            "are for --against ctranslate2)"
        )
    if args.against == "ctranslate2":
        supported = _ct2_compute_types()
        if compute_type not in supported:
            raise ValueError(
                f"--against-compute-type {compute_type}: this CTranslate2 runs "
                f"{', '.join(sorted(supported))} on this CPU"
            )
    inter = args.against_inter_threads
    if inter is not None and args.against != "ctranslate2":
        raise ValueError("--against-inter-threads is for -m MODEL --against ctranslate2")
    if inter is not None and inter > torch.get_num_threads():
        raise ValueError(
            f"--against-inter-threads {inter}: more batches side by side than the "
            f"{torch.get_num_threads()} threads there are"
        )
    if data.test is None or not data.test.src:
        raise ValueError("--against needs a test split with src and tgt files")
    sources = read_text(os.path.join(data.root, data.test.src))
    refs = read_text(os.path.join(data.root, data.test.tgt))
    n = args.sentences or len(sources)
    rounds = 3 if args.rounds is None else args.rounds
    if args.whole_process:
        from seq2seq.export.processes import compare_processes

        result = compare_processes(
            args.model,
            sources[:n],
            refs[:n],
            torch.get_num_threads(),
            rounds,
            args.max_sentences,
            args.decode_precision,
            compute_type,
            args.stop or "best",
            args.against_inter_threads,
        )
    else:
        result = compare(
            args.model,
            args.against,
            sources[:n],
            refs[:n],
            rounds,
            args.max_sentences,
            args.decode_precision,
            compute_type,
            args.stop,
            args.against_inter_threads,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(f"{key:<36} {value}" for key, value in result.items()))
    return 0
