"""The Python API, and the one decoding path: `seq2seq translate`, `evaluate -m`, bench and
validation during training all decode through a `Translator`.

    from seq2seq import Translator

    translator = Translator.load("runs/multi30k_en_de")      # or a list: an ensemble
    translator.translate(["A dog runs.", ""])                # ["Ein Hund rennt.", ""]
    translator.translate(["A dog runs."], beam=5, nbest=2)   # [[(text, score), (text, score)]]
    translator.score(["A dog runs."], ["Ein Hund rennt."])   # [log P(target | source)]
    translator.score("A dog runs.", "Ein Hund rennt.")       # log P(target | source)

Lines follow `seq2seq translate`'s rules (seq2seq.inference.translate): a blank line (or one
of no pieces, such as a lone zero-width space) gives "", an over-long one is truncated with a
warning. Decoding settings default to the model's saved `decode` section; each keyword given
replaces one of them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from seq2seq.config import DecodeConfig
from seq2seq.inference.checkpoint import LoadedModel, load_model
from seq2seq.inference.ensemble import Ensemble, check_shared_tokenizer
from seq2seq.inference.flat import flat_decoder
from seq2seq.inference.search import BOS, EOS, PAD, Decoder, Hypothesis, search
from seq2seq.inference.streams import cpu_streams, map_streams
from seq2seq.inference.translate import (
    check_lengths,
    encode_lines,
    make_batches,
    one_line,
    pad_batch,
    prepare_model,
)
from seq2seq.nn.transformer import Transformer


class Translator:
    """One model, or an ensemble of models sharing a tokenizer, with its decoding defaults.

    Args:
        models: prepared models (device and precision set, eval mode); several: an ensemble
            whose per-step probabilities are averaged (seq2seq.inference.ensemble).
        tokenizer: seq2seq.data.tokenizer.Tokenizer; only the text methods need it.
        decode: the decoding defaults.
        paths: the checkpoint files, for messages.
    """

    def __init__(
        self,
        models: Sequence[Transformer],
        tokenizer,
        decode: DecodeConfig,
        paths: Sequence[Path] = (),
    ):
        if not models:
            raise ValueError("a Translator needs at least one model")
        self.models = list(models)
        self.tokenizer, self.decode, self.paths = tokenizer, decode, list(paths)
        decoders = [flat_decoder(model) for model in self.models]  # the same states, faster
        self.decoder: Decoder = decoders[0] if len(decoders) == 1 else Ensemble(decoders)
        self.max_positions = min(model.cfg.max_positions for model in self.models)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        device: str = "auto",
        precision: str = "fp32",
        pack_weights: bool = True,
    ) -> Translator:
        """Load a run directory or checkpoint file, or a list of them (an ensemble).

        Args:
            device: 'auto' (cuda when available; the CPU for int8), 'cpu' or 'cuda'.
            precision: 'fp32', 'bf16', 'fp16' or 'int8' (seq2seq.inference.translate.prepare_model).
            pack_weights: in float32 or bf16 on a CPU, decode with the weights of the layers
                that run at every step packed once (seq2seq.inference.translate.prepare_model).

        Raises:
            ValueError: one line, naming the file: unreadable checkpoints, or ensemble models
                with different tokenizers (naming both).
        """
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        if not paths:
            raise ValueError("Translator.load needs at least one model")
        return cls.of([load_model(p) for p in paths], device, precision, pack_weights)

    @classmethod
    def of(
        cls,
        loaded: Sequence[LoadedModel],
        device: str = "auto",
        precision: str = "fp32",
        pack_weights: bool = True,
    ) -> Translator:
        """A Translator of checkpoints already loaded (seq2seq.inference.checkpoint.load_model),
        prepared as `load` prepares them; their models are decoding-only from then on."""
        check_shared_tokenizer([one.path for one in loaded], [one.tokenizer for one in loaded])
        models = [prepare_model(one.model, device, precision, pack_weights) for one in loaded]
        return cls(models, loaded[0].tokenizer, loaded[0].decode, [one.path for one in loaded])

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def settings(
        self,
        beam: int | None = None,
        nbest: int | None = None,
        lenpen: float | None = None,
        max_len_a: float | None = None,
        max_len_b: int | None = None,
        min_len: int | None = None,
        max_tokens: int | None = None,
        stop: str | None = None,
        max_sentences: int | None = None,
    ) -> DecodeConfig:
        """The saved decoding defaults with the settings given (None keeps the default)."""
        given = {
            "beam": beam,
            "nbest": nbest,
            "lenpen": lenpen,
            "max_len_a": max_len_a,
            "max_len_b": max_len_b,
            "min_len": min_len,
            "max_tokens": max_tokens,
            "stop": stop,
            "max_sentences": max_sentences,
        }
        cfg = dataclasses.replace(self.decode, **{k: v for k, v in given.items() if v is not None})
        check_lengths(cfg, self.max_positions)
        return cfg

    # --- ids ------------------------------------------------------------------------------
    def decode_batch(
        self, src: Tensor, cfg: DecodeConfig | None = None, scores: bool = True
    ) -> list[list[Hypothesis]]:
        """Search one padded batch src (B, S), on the models' device: per sentence, up to
        cfg.nbest hypotheses, best first (what validation calls on its loader's batches).
        `scores=False`: greedy search may leave them out (NaN; seq2seq.inference.search)."""
        return search(self.decoder, src, cfg or self.decode, self.max_positions, scores)

    def translate_ids(
        self,
        src_ids: list[list[int]],
        cfg: DecodeConfig | None = None,
        progress=None,
        scores: bool = True,
    ) -> list[list[Hypothesis]]:
        """Hypotheses per source (in the given order); [] for an empty source (a blank line).
        Sources are sorted by length into batches of cfg.max_tokens (padding included) and at
        most cfg.max_sentences sentences. On a CPU the batches are decoded in one stream per
        torch thread, each on one thread (seq2seq.inference.streams), and cut evenly for them
        (`make_batches`' streams). `scores=False` when only the text is wanted: greedy search
        then skips them (NaN)."""
        cfg = cfg or self.decode
        results: list[list[Hypothesis]] = [[] for _ in src_ids]
        streams = cpu_streams(self.device, len(src_ids))
        lengths = [len(s) for s in src_ids]
        batches = make_batches(lengths, cfg.max_tokens, cfg.max_sentences, streams)
        streams = min(streams, len(batches))  # one batch: all threads on it

        def run(batch: list[int]) -> tuple[list[int], list[list[Hypothesis]]]:
            return batch, self.decode_batch(
                pad_batch([src_ids[i] for i in batch], self.device), cfg, scores
            )

        for batch, hyps in map_streams(run, batches, streams):
            for i, one in zip(batch, hyps, strict=True):
                results[i] = one
            if progress is not None:
                progress.update(len(batch))
        return results

    # --- text -----------------------------------------------------------------------------
    def encode(self, lines: list[str], name: str = "<input>", first: int = 1) -> list[list[int]]:
        """Source ids per line (seq2seq.inference.translate.encode_lines)."""
        return encode_lines(self.tokenizer, _texts(lines, "line"), self.max_positions, name, first)

    def text(self, hypothesis: Hypothesis) -> str:
        """A hypothesis as one line of detokenized text."""
        return one_line(self.tokenizer.decode_tgt(hypothesis.tokens))

    def translate_texts(
        self, lines: list[str], cfg: DecodeConfig | None = None, name: str = "<input>"
    ) -> list[str]:
        """The best translation of each line ("" for a blank line); `name` is the file the
        lines come from, for the truncation warnings ("long.en:3: ...")."""
        hyps = self.translate_ids(self.encode(list(lines), name), cfg, scores=False)
        return [self.text(h[0]) if h else "" for h in hyps]

    def translate(
        self,
        lines: str | Sequence[str],
        beam: int | None = None,
        nbest: int | None = None,
        lenpen: float | None = None,
        max_len_a: float | None = None,
        max_len_b: int | None = None,
        min_len: int | None = None,
        max_tokens: int | None = None,
        stop: str | None = None,
        max_sentences: int | None = None,
    ) -> list[str] | list[list[tuple[str, float]]] | str | list[tuple[str, float]]:
        """Translate raw sentences.

        Args:
            lines: sentences, or one sentence (then one result is returned, not a list). A
                string holding line breaks ("\n", "\r\n") is translated line by line, as
                `seq2seq translate` reads a file, and its translation has as many lines
                ("\n" between them), never one merged line; with `nbest`, a string must be
                one line (a line break at its end is dropped).
            beam, nbest, lenpen, max_len_a, max_len_b, min_len, max_tokens, stop,
                max_sentences: as the `seq2seq translate` options; None keeps the model's
                saved default.

        Returns:
            One string per line, or with `nbest`, per line a list of up to nbest
            (hypothesis, score) pairs, best first; score is the length-penalized
            log-probability (seq2seq.inference.search). A blank line gives "" (or [("", 0.0)]).
        """
        single = isinstance(lines, str)
        batch = _texts([lines] if single else lines, "line")
        cfg = self.settings(
            beam, nbest, lenpen, max_len_a, max_len_b, min_len, max_tokens, stop, max_sentences
        )
        if nbest is None:
            parts = [_split_lines(text) for text in batch]
            every = [line for part in parts for line in part]
            texts = iter(self.translate_texts(every, cfg))
            out: list = ["\n".join(next(texts) for _ in part) for part in parts]
        else:
            batch = [_one_line(text, "line", i) for i, text in enumerate(batch)]
            hyps = self.translate_ids(self.encode(batch), cfg, scores=True)
            out = [[(self.text(x), x.score) for x in h] or [("", 0.0)] for h in hyps]
        return out[0] if single else out

    @torch.inference_mode()
    def score(
        self, sources: str | Sequence[str], targets: str | Sequence[str]
    ) -> list[float] | float:
        """Forced decoding: log P(target | source) of each pair, the sum of the target's token
        log-probabilities with the final EOS included, not length-normalized (fairseq's
        --score-reference; divide by the pieces + 1 for a per-token mean). Ensembles average
        probabilities per step as in search. A blank source gives 0.0 with a blank target and
        -inf otherwise, as translate turns a blank line into a blank line.

        Two strings are one pair and give one float, as `translate` takes one string as one
        line (a string is never read as a sequence of characters); two lists give a list.

        Raises:
            TypeError: one string and one list, or bytes rather than str.
            ValueError: unequal counts, a source or target of several lines, or a target longer
                than the model's positions (each named).
        """
        single = isinstance(sources, str)
        if single != isinstance(targets, str):
            raise TypeError("give the source and target both as strings or both as lists")
        sources = _texts([sources] if single else sources, "source")
        targets = _texts([targets] if single else targets, "target")
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets: give one each")
        sources = [_one_line(text, "source", i) for i, text in enumerate(sources)]
        targets = [_one_line(text, "target", i) for i, text in enumerate(targets)]
        src_ids = self.encode(sources)
        tgt_ids = self.tokenizer.encode_tgt(targets)
        for i, ids in enumerate(tgt_ids):
            if len(ids) + 1 > self.max_positions:
                raise ValueError(
                    f"target {i + 1}: {len(ids)} pieces exceed the model's "
                    f"max_positions={self.max_positions} (EOS included): it cannot be scored"
                )
        scores = [0.0 if not ids else -float("inf") for ids in tgt_ids]
        lengths = [
            max(len(s), len(t) + 1) if s else 0 for s, t in zip(src_ids, tgt_ids, strict=True)
        ]
        for batch in make_batches(lengths, self.decode.max_tokens, self.decode.max_sentences):
            sums = self._forced([src_ids[i] for i in batch], [tgt_ids[i] for i in batch]).tolist()
            for i, value in zip(batch, sums, strict=True):
                scores[i] = value
        return scores[0] if single else scores

    def _forced(self, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> Tensor:
        """Summed log-probabilities (B,) of targets (pieces + EOS) given sources."""
        device = self.device
        src = pad_batch(src_ids, device)  # (B, S)
        tgt_in = pad_batch([[BOS, *t] for t in tgt_ids], device)  # (B, T)
        tgt_out = pad_batch([[*t, EOS] for t in tgt_ids], device)  # (B, T)
        memory = self.decoder.encode(src)
        states = self.decoder.decode(tgt_in, memory, self.decoder.new_cache())  # (B, T, D)
        logits = self.decoder.project(states)
        log_probs = torch.log_softmax(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), -1
        )
        token = log_probs.gather(-1, tgt_out[..., None]).squeeze(-1)  # (B, T)
        return token.masked_fill(tgt_out == PAD, 0.0).sum(dim=1)


def _texts(items: Sequence, what: str) -> list:
    """`items` as a list, once each is a string; else TypeError naming the first that is not
    (1-based), rather than a tokenizer's AttributeError deep inside. Bytes are refused whole:
    iterated, they would be read as ints ("line 1: expected a string, got int")."""
    if isinstance(items, bytes | bytearray):
        raise TypeError(
            f"{what}s must be str, not {type(items).__name__}: decode them first (.decode())"
        )
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what} {i + 1}: expected a string, got {type(item).__name__}")
    return items


def _split_lines(text: str) -> list[str]:
    """The lines of `text` as `seq2seq translate` reads a file's (read_lines): split at "\n",
    each without a "\r" before it. A line break at the end leaves an empty last line, so the
    translation ends in one too."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _one_line(text: str, what: str, i: int) -> str:
    """`text` without a line break at its end; ValueError naming it (1-based) if it holds
    another: one string, one line."""
    line = text.removesuffix("\n").removesuffix("\r")
    if breaks := line.count("\n"):
        raise ValueError(
            f"{what} {i + 1} holds {breaks + 1} lines: give one line per string (str.splitlines())"
        )
    return line
