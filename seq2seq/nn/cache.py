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
The self-attention keys/values are reselected lazily, by the next step's `append_self`, which
gathers the kept rows and appends the new position in one copy instead of two (an
index_select and a cat): 9% of a beam-5 decode on a CPU went to those two copies.

They are stored time-major, (T, B, H, Dh), and handed to attention as (B, H, T, Dh) views:
then the gathered past is the contiguous front of the new tensor, which a CPU's index_select
fills at memory speed, where into the rows of a (B, H, T + 1, Dh) tensor it wrote strided
(the whole default-recipe beam-5 decode about 4% faster on a 2-core Xeon; attention takes
strided keys and values as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's cached keys and values: self-attention's (T, B, H, Dh), time-major
    (`append_self` returns them as attention takes them), cross-attention's (B, H, S, Dh)."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    self_rows: Tensor | None = None
    """The rows of self_k / self_v that the next step keeps (None: all, in order)."""
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None

    @property
    def self_length(self) -> int:
        """Positions cached for self-attention."""
        return 0 if self.self_k is None else self.self_k.size(0)

    def append_self(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's self-attention keys/values (B, H, L, Dh); return all keys/values
        so far, (B, H, T_past + L, Dh) views of the time-major cache."""
        self.self_k = _gather_append(self.self_k, self.self_rows, k)
        self.self_v = _gather_append(self.self_v, self.self_rows, v)
        self.self_rows = None
        return _heads_first(self.self_k), _heads_first(self.self_v)

    def select_self(self, rows: Tensor) -> None:
        """Keep self-attention rows `rows`, at the next `append_self`."""
        self.self_rows = rows if self.self_rows is None else self.self_rows[rows]

    def select_cross(self, index: Tensor) -> None:
        if self.cross_k is not None:
            self.cross_k = self.cross_k.index_select(0, index)
            self.cross_v = self.cross_v.index_select(0, index)


def _heads_first(cached: Tensor) -> Tensor:
    """(T, B, H, Dh) -> a (B, H, T, Dh) view."""
    return cached.permute(1, 2, 0, 3)


def _gather_append(past: Tensor | None, rows: Tensor | None, new: Tensor) -> Tensor:
    """cat([past[:, rows], new time-major], dim=0), writing each element once: past
    (T, B_old, H, Dh) or None, new (B, H, L, Dh) -> (T + L, B, H, Dh)."""
    B, H, L, Dh = new.shape
    T = 0 if past is None else past.size(0)
    out = new.new_empty(T + L, B, H, Dh)
    if past is not None and rows is not None:
        torch.index_select(past, 1, rows, out=out[:T])  # out[:T] is contiguous
    elif past is not None:
        out[:T] = past
    out[T:] = new.permute(2, 0, 1, 3)
    return out


@dataclass
class DecoderCache:
    """All decoder layers' caches plus how many target positions have been decoded."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> DecoderCache:
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (B_new,), in that order, when each row is its own sentence;
        B_new may be smaller than B."""
        for layer in self.layers:
            layer.select_self(index)
            layer.select_cross(index)

    def reorder_beams(self, rows: Tensor, sentences: Tensor | None) -> None:
        """Beam search: self-attention K/V keep `rows` (N' * k,); the per-sentence
        cross-attention K/V keep `sentences` (N',), or stay as they are when None."""
        for layer in self.layers:
            layer.select_self(rows)
            if sentences is not None:
                layer.select_cross(sentences)
