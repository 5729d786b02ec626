"""How a batch's tokens are laid out for the model, beyond right-padding: which positions the
position-wise layers may skip (`Packing`), and several sentences sharing a row (`Rows`).

Neither changes what the model computes for a sentence (tests prove it); both only change how
much work the padded layout costs. See `seq2seq.nn.transformer`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packing:
    """Where the real tokens of a right-padded (B, L) batch are: `index` (N,) holds their flat
    positions b * L + l. `pack` keeps those rows of (B, L, C); `unpack` puts them back, with
    zeros at padding."""

    index: Tensor
    B: int
    L: int

    @classmethod
    def of(cls, real: Tensor, index: Tensor | None = None) -> Packing | None:
        """For a (B, L) mask of real tokens, or their flat positions `index` (N,) when the
        host already knows them (a collated batch carries them). None when there is no
        padding to skip, and on accelerators without `index`: finding the real tokens (a
        data-dependent size) would make the host wait for the device in every step."""
        B, L = real.shape
        if index is not None:  # only shapes are compared: no device sync
            return None if index.numel() == B * L else cls(index, B, L)
        if real.device.type != "cpu" or bool(real.all()):
            return None
        return cls(real.reshape(-1).nonzero().squeeze(1), B, L)

    def pack(self, x: Tensor) -> Tensor:
        return x.reshape(self.B * self.L, x.size(-1)).index_select(0, self.index)  # (N, C)

    def unpack(self, x: Tensor) -> Tensor:
        # In place into fresh zeros: the out-of-place index_copy would copy the zeros first.
        full = x.new_zeros(self.B * self.L, x.size(-1)).index_copy_(0, self.index, x)
        return full.view(self.B, self.L, x.size(-1))  # (B, L, C)


@dataclass
class Rows:
    """Several sentence pairs packed side by side into each row of a training batch, so that
    attention runs over a few long rows instead of many short sentences (on a GPU, whose
    attention kernels tile 64-128 query rows per sentence and head). Per token of src (B, S)
    and tgt_in (B, T): `*_sentence`, which pair of its row it belongs to (-1 at padding), and
    `*_position`, its position within that sentence. Masks keep every sentence to itself, so
    each one's states are what it would get alone. Made on the host (`batching.collate`)."""

    src_sentence: Tensor
    src_position: Tensor
    tgt_sentence: Tensor
    tgt_position: Tensor

    @staticmethod
    def same_sentence(queries: Tensor, keys: Tensor) -> Tensor:
        """(B, Lq), (B, Lk) sentence numbers -> (B, 1, Lq, Lk) mask: a query sees its own
        sentence's keys; a padding query sees every key (its output is never used, and a
        query that sees no key would give NaN)."""
        q = queries[:, None, :, None]
        return (q == keys[:, None, None, :]) | (q < 0)

    def src_mask(self) -> Tensor:
        return self.same_sentence(self.src_sentence, self.src_sentence)  # (B, 1, S, S)

    def tgt_mask(self) -> Tensor:
        """Its own sentence's keys up to the query (causal)."""
        T = self.tgt_sentence.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.tgt_sentence.device).tril()
        return self.same_sentence(self.tgt_sentence, self.tgt_sentence) & causal  # (B, 1, T, T)

    def cross_mask(self) -> Tensor:
        return self.same_sentence(self.tgt_sentence, self.src_sentence)  # (B, 1, T, S)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Rows:
        return Rows(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))

    def pin_memory(self) -> Rows:
        return Rows(*(t.pin_memory() for t in vars(self).values()))
