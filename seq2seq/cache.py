"""Key/value cache for incremental decoding (the fairseq incremental-decoding protocol).

Per decoder layer:
- self-attention keys/values grow by one position per decoding step;
- cross-attention keys/values are projected from the encoder memory once per sentence, and
  stay one row per sentence: with beam search, a sentence's k beams (rows sentence-major,
  row = sentence * k + beam) share them instead of holding k copies.
Besides, the output projection's weight in the form the search's steps use (packed once per
search for the CPU's kernel).

`reorder(index)` reselects rows when every row is its own sentence (greedy search);
`reorder_beams(rows, sentences)` follows the surviving beams and drops finished sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's cached keys and values, each (B, H, T or S, Dh)."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None

    def append_self(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's self-attention keys/values; return all keys/values so far."""
        if self.self_k is not None:
            k = torch.cat([self.self_k, k], dim=2)  # (B, H, T_past + T_new, Dh)
            v = torch.cat([self.self_v, v], dim=2)
        self.self_k, self.self_v = k, v
        return k, v

    def select(self, names: tuple[str, ...], index: Tensor) -> None:
        for name in names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


@dataclass
class DecoderCache:
    """All decoder layers' caches plus how many target positions have been decoded."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0
    output_weight: Tensor | None = None
    """The output projection's weight as the search's steps use it: packed for the CPU's
    kernel (`seq2seq.linear.pack`) at the first step, or the weight itself."""

    @classmethod
    def empty(cls, n_layers: int) -> DecoderCache:
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (B_new,), in that order, when each row is its own sentence;
        B_new may be smaller than B."""
        for layer in self.layers:
            layer.select(_ALL, index)

    def reorder_beams(self, rows: Tensor, sentences: Tensor | None) -> None:
        """Beam search: self-attention K/V keep `rows` (N' * k,); the per-sentence
        cross-attention K/V keep `sentences` (N',), or stay as they are when None."""
        for layer in self.layers:
            layer.select(_SELF, rows)
            if sentences is not None:
                layer.select(_CROSS, sentences)


_SELF, _CROSS = ("self_k", "self_v"), ("cross_k", "cross_v")
_ALL = _SELF + _CROSS
