"""Ensembles: several models decode as one `Decoder` (seq2seq.inference.search).

At every step each model gives its own next-token distribution, and the ensemble's is their
average in probability space, as fairseq's EnsembleModel does by default:

    log p(y_t | ...) = logsumexp_m log p_m(y_t | ...) - log M.

Each model keeps its own encoder memory and key/value cache, so models of different shapes
(d_model, layers, heads) combine; they must share one tokenizer, since they score the same
token ids (`check_shared_tokenizer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.inference.flat import FlatDecoder
from seq2seq.nn.cache import DecoderCache
from seq2seq.nn.transformer import Memory, Transformer


@dataclass
class EnsembleMemory:
    """Each model's encoder output, for the same (B, S) source."""

    parts: list[Memory]

    def select(self, index: Tensor) -> EnsembleMemory:
        return EnsembleMemory([memory.select(index) for memory in self.parts])


@dataclass
class EnsembleCache:
    """Each model's key/value cache; search reorders them together."""

    parts: list[DecoderCache]

    def reorder(self, index: Tensor) -> None:
        for cache in self.parts:
            cache.reorder(index)

    def reorder_beams(self, rows: Tensor, sentences: Tensor | None) -> None:
        for cache in self.parts:
            cache.reorder_beams(rows, sentences)


class Ensemble:
    """M models as one Decoder. Its decoder states are the models' states concatenated on the
    last dimension, (R, L, sum of d_model); `project` splits them again and returns the
    averaged log-probabilities (R, V), which search's log_softmax leaves as they are."""

    def __init__(self, models: Sequence[Transformer | FlatDecoder]):
        sizes = {model.tgt_vocab_size for model in models}
        if len(sizes) != 1:
            raise ValueError(f"ensemble models have different target vocabularies: {sorted(sizes)}")
        self.models = list(models)
        self.widths = [model.cfg.d_model for model in self.models]

    @property
    def tgt_vocab_size(self) -> int:
        return self.models[0].tgt_vocab_size

    def encode(self, src: Tensor) -> EnsembleMemory:
        return EnsembleMemory([model.encode(src) for model in self.models])

    def new_cache(self, capacity: int | None = None) -> EnsembleCache:
        return EnsembleCache([model.new_cache(capacity) for model in self.models])

    def decode(self, tgt_in: Tensor, memory: EnsembleMemory, cache: EnsembleCache) -> Tensor:
        states = [
            model.decode(tgt_in, part, part_cache)
            for model, part, part_cache in zip(self.models, memory.parts, cache.parts, strict=True)
        ]
        return torch.cat(states, dim=-1)  # (R, L, sum D)

    def project(self, states: Tensor) -> Tensor:
        """Averaged probabilities, as log-probabilities (..., V) in at least float32."""
        parts = states.split(self.widths, dim=-1)
        log_probs = [
            torch.log_softmax(_at_least_float32(model.project(part)), dim=-1)
            for model, part in zip(self.models, parts, strict=True)
        ]
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.models))


def _at_least_float32(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def check_shared_tokenizer(paths: Sequence[object], tokenizers: Sequence[object]) -> None:
    """Refuse models whose SentencePiece models differ (compared as serialized bytes), naming
    the first model's file and the other's."""
    first = tokenizers[0].to_state()
    for path, tokenizer in zip(paths[1:], tokenizers[1:], strict=True):
        if tokenizer.to_state() != first:
            raise ValueError(
                f"{paths[0]} and {path} have different tokenizers (their SentencePiece models "
                "differ); the models of an ensemble must share one"
            )
