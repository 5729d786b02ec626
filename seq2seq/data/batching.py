"""Token-budget batches: bucketed by length, shuffled per epoch, sharded across DDP ranks.

A batch holds as many pairs as fit `max_tokens` COUNTING PADDING: n_pairs * longest <= max_tokens
on the source side (pieces + EOS) and on the target side (BOS + pieces) alike. Pairs are sorted
by (target, source) length with ties broken at random, cut greedily into batches, and the
batches are shuffled; all of it is a function of (seed, epoch) alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID
from seq2seq.layout import Rows

if TYPE_CHECKING:  # `translate` cuts batches too and must start without importing datasets
    from datasets import Dataset

log = logging.getLogger(__name__)


def batch_lengths(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the tokens it adds to a batch: len(src_ids) and len(tgt_ids) + 1 (BOS or EOS)."""
    from seq2seq.data.pipeline import id_lengths

    src_len, tgt_len = id_lengths(ds)
    return src_len, tgt_len + 1


def pack(
    src_len: np.ndarray, tgt_len: np.ndarray, max_tokens: int, budget: str = "padded"
) -> list[int]:
    """Greedy cut points of rows, in the given order, into batches within the budget: the one
    batch cutter of training, validation, `translate` and `bench`.

    `budget` is what `max_tokens` bounds: "padded", the batch's rows times its longest
    sentence on either side (what the model computes over); or "target", the sum of the real
    target tokens (how the peers' benchmark scripts cut, `seq2seq bench`). A row over the
    budget on its own gets a batch by itself (it is never dropped: cleaning's `max_length` is
    the place to drop long pairs).

    Returns:
        The end offset of every batch (the last one equals len(src_len)).
    """
    if budget not in ("padded", "target"):
        raise ValueError(f"budget must be 'padded' or 'target', not {budget!r}")
    n = len(src_len)
    if budget == "target":
        # Batch after batch: the first row whose running sum of target tokens passes the budget.
        total = np.cumsum(np.asarray(tgt_len, dtype=np.int64))
        ends, start = [], 0
        while start < n:
            base = total[start - 1] if start else 0
            end = int(np.searchsorted(total, base + max_tokens, side="right"))
            start = max(end, start + 1)  # a row over the budget alone gets a batch by itself
            ends.append(start)
        return ends
    # Padded: a batch of k rows from `start` costs k * (its longest row on either side); each
    # batch is found with vector operations over a window that doubles until it holds the cut.
    longest = np.maximum(np.asarray(src_len, dtype=np.int64), np.asarray(tgt_len, dtype=np.int64))
    ends, start, window = [], 0, 256
    while start < n:
        while True:
            stop = min(start + window, n)
            cost = np.maximum.accumulate(longest[start:stop]) * np.arange(1, stop - start + 1)
            over = np.flatnonzero(cost > max_tokens)
            if len(over) or stop == n:
                break
            window *= 2
        size = max(int(over[0]), 1) if len(over) else stop - start
        start += size
        ends.append(start)
    return ends


def cut(
    order: np.ndarray,
    src_len: np.ndarray,
    tgt_len: np.ndarray,
    max_tokens: int,
    budget: str = "padded",
) -> list[np.ndarray]:
    """The rows `order` lists, in that order, cut into batches by `pack`."""
    order = np.asarray(order, dtype=np.int64)
    ends = pack(np.asarray(src_len)[order], np.asarray(tgt_len)[order], max_tokens, budget)
    return np.split(order, ends[:-1]) if ends else []


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields lists of row indices: this rank's token-budget batches of one epoch.

    Every pair is in exactly one batch of the epoch. Across `num_replicas` ranks the epoch's
    batches are dealt round-robin; when their number does not divide evenly, the first batches
    of the epoch's order are repeated so that every rank gets the same number (a few pairs
    are then seen twice in that epoch; none is ever skipped).

    Args:
        src_lengths: per row, source tokens (pieces + EOS).
        tgt_lengths: per row, target tokens (pieces + 1), see `batch_lengths`.
        max_tokens: the budget, padding included, for each side.
        shuffle: shuffle ties and batch order per epoch (training); False keeps length order.
        seed: with the epoch, fixes the order.
        num_replicas: ranks sharing the epoch (default: the torch.distributed world size, or 1).
        rank: this rank (default: the torch.distributed rank, or 0).
    """

    def __init__(
        self,
        src_lengths: np.ndarray,
        tgt_lengths: np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas or (
            torch.distributed.get_world_size() if distributed else 1
        )
        self.rank = (
            rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        )
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        # Lightning calls `batch_sampler.sampler.set_epoch(epoch)` at every epoch start.
        self.sampler = self
        self._epoch, self._start, self._position = 0, 0, 0
        # The sorted (tgt, src) length sequence is the same whatever the tie order, so the
        # cut points are computed once and hold for every epoch.
        order = np.lexsort((self.src_lengths, self.tgt_lengths))
        self._ends = pack(self.src_lengths[order], self.tgt_lengths[order], max_tokens)
        if n_long := int(np.sum(np.maximum(self.src_lengths, self.tgt_lengths) > max_tokens)):
            log.warning(
                "%d pairs exceed max_tokens=%d alone; each gets a batch by itself",
                n_long,
                max_tokens,
            )

    @property
    def epoch(self) -> int:
        """The epoch whose batches `__iter__` yields."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a position restored by `load_state_dict` for it is kept."""
        if epoch != self._epoch:
            self._epoch, self._start, self._position = epoch, 0, 0

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of `epoch` in order, padded to a multiple of num_replicas."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.src_lengths)
        ties = rng.permutation(n) if self.shuffle else np.arange(n)
        order = ties[np.lexsort((self.src_lengths[ties], self.tgt_lengths[ties]))]
        batches = np.split(order, self._ends[:-1])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        n_padded = len(self) * self.num_replicas
        return [batches[i % len(batches)] for i in range(n_padded)]

    def __len__(self) -> int:
        """Batches per rank per epoch (the full epoch, even when resuming mid-epoch)."""
        return math.ceil(len(self._ends) / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches(self._epoch)[self.rank :: self.num_replicas]
        start, self._start = self._start, 0
        for position in range(start, len(mine)):
            self._position = position + 1
            yield mine[position].tolist()

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches yielded so far in it (DataLoader prefetching runs ahead of training)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue `state["epoch"]` after `state["position"]` batches of this rank."""
        position = state["position"]
        if state["num_replicas"] != self.num_replicas:
            # The global order is the same; resume after the same number of global batches.
            position = position * state["num_replicas"] // self.num_replicas
            log.warning(
                "resuming with %d ranks instead of %d: the epoch continues approximately",
                self.num_replicas,
                state["num_replicas"],
            )
        if state["seed"] != self.seed:
            log.warning(
                "resuming with data seed %d instead of %d: the epoch order changes",
                self.seed,
                state["seed"],
            )
        self._epoch, self._start, self._position = state["epoch"], position, position


@dataclass
class Batch:
    """Padded id tensors of one batch (pad = 0). `.to(device)` lets Lightning move it."""

    src: Tensor
    """(B, S) source ids, each row ending in EOS."""
    tgt_in: Tensor
    """(B, T) decoder input: BOS + target pieces."""
    tgt_out: Tensor
    """(B, T) decoder targets: target pieces + EOS."""
    index: Tensor
    """(B,) dataset row of each pair (for references, attention plots)."""
    tgt_positions: Tensor
    """(n_tgt_tokens,) flat positions b * T + t of the real tokens of `tgt_out`, found on the
    host while collating, so the loss never has to ask the device how many there are."""
    src_positions: Tensor
    """(n_src_tokens,) flat positions b * S + s of the real tokens of `src`, likewise: the
    encoder skips source padding on any device without asking the device where it is."""
    n_src_tokens: int
    """Real (non-pad) source tokens."""
    n_tgt_tokens: int
    """Real (non-pad) tokens in `tgt_out`: the loss's token count."""
    rows: Rows | None = None
    """With `collate(row_tokens=...)`: each row holds several pairs, and this says which token
    belongs to which (then B above counts rows, not pairs)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor | Rows)
        }
        return dataclasses.replace(self, **move)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor | Rows)
        }
        return dataclasses.replace(self, **pinned)

    def __len__(self) -> int:
        return self.src.shape[0]


def collate(
    items: Sequence[tuple[int, Sequence[int], Sequence[int]]], row_tokens: int | None = None
) -> Batch:
    """Pad (row index, src_ids, tgt_ids) triples into a `Batch`; adds BOS/EOS to the target.

    With `row_tokens`, pairs are packed side by side, in their order, into rows of up to
    `row_tokens` tokens a side (at least the longest pair's), a new row when the next pair
    does not fit (`Rows`); otherwise each pair is its own row.
    """
    if row_tokens is None:
        rows = [[i] for i in range(len(items))]
    else:
        rows = _pack_rows(
            [len(s) for _, s, _ in items], [len(t) + 1 for _, _, t in items], row_tokens
        )
    B = len(rows)
    S = max(sum(len(items[i][1]) for i in row) for row in rows)
    T = max(sum(len(items[i][2]) + 1 for i in row) for row in rows)
    src = np.full((B, S), PAD_ID, dtype=np.int64)
    tgt_in = np.full((B, T), PAD_ID, dtype=np.int64)
    tgt_out = np.full((B, T), PAD_ID, dtype=np.int64)
    for r, row in enumerate(rows):
        s_at = t_at = 0  # where the row's next sentence starts, on each side
        for i in row:
            _, s, t = items[i]
            s_end, t_end = s_at + len(s), t_at + len(t) + 1
            src[r, s_at:s_end] = s
            tgt_in[r, t_at], tgt_in[r, t_at + 1 : t_end] = BOS_ID, t
            tgt_out[r, t_at : t_end - 1], tgt_out[r, t_end - 1] = t, EOS_ID
            s_at, t_at = s_end, t_end
    tgt_positions = np.flatnonzero(tgt_out != PAD_ID)
    src_positions = np.flatnonzero(src != PAD_ID)
    return Batch(
        src=torch.from_numpy(src),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        index=torch.tensor([items[i][0] for row in rows for i in row], dtype=torch.long),
        tgt_positions=torch.from_numpy(tgt_positions),
        src_positions=torch.from_numpy(src_positions),
        n_src_tokens=len(src_positions),
        n_tgt_tokens=len(tgt_positions),
        rows=None if row_tokens is None else _row_layout(items, rows, S, T),
    )


def _row_layout(
    items: Sequence[tuple[int, Sequence[int], Sequence[int]]], rows: list[list[int]], S: int, T: int
) -> Rows:
    """The `Rows` of `collate`'s rows: source (B, S) and target (B, T, BOS/EOS included)."""
    src = _numbering([[len(items[i][1]) for i in row] for row in rows], S)
    tgt = _numbering([[len(items[i][2]) + 1 for i in row] for row in rows], T)
    return Rows(*(torch.from_numpy(a) for a in (*src, *tgt)))


def _numbering(lengths: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows of sentences of these lengths side by side: each token's sentence in its row
    (-1 at padding) and its position in that sentence, (B, width) each."""
    sentence = np.full((len(lengths), width), -1, dtype=np.int64)
    position = np.zeros_like(sentence)
    for r, lens in enumerate(lengths):
        n = sum(lens)
        sentence[r, :n] = np.repeat(np.arange(len(lens)), lens)
        position[r, :n] = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)  # - its start
    return sentence, position


def _pack_rows(src_lengths: list[int], tgt_lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Next fit: pairs in order, a new row when the next one would pass the capacity of
    either side (`row_tokens`, or the longest pair's length on that side)."""
    cap_s, cap_t = max(row_tokens, *src_lengths), max(row_tokens, *tgt_lengths)
    rows: list[list[int]] = []
    used_s = used_t = cap_s + cap_t  # no open row yet
    for i, (ls, lt) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
        if used_s + ls > cap_s or used_t + lt > cap_t:
            rows.append([])
            used_s = used_t = 0
        rows[-1].append(i)
        used_s, used_t = used_s + ls, used_t + lt
    return rows


class PairDataset(torch.utils.data.Dataset):
    """A tokenized `datasets.Dataset` as a torch Dataset of (row, src_ids, tgt_ids) triples.

    `__getitems__` fetches a whole batch with one Arrow read (the DataLoader uses it).
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds.select_columns(["src_ids", "tgt_ids"])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, list[int], list[int]]:
        row = self.ds[int(i)]
        return int(i), row["src_ids"], row["tgt_ids"]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, list[int], list[int]]]:
        rows = self.ds[indices]
        return list(zip(indices, rows["src_ids"], rows["tgt_ids"], strict=True))


class RowSubsetBatches:
    """A batch sampler over a subset of a dataset's rows: `sampler` cuts batches from the
    subset's lengths, and each batch comes out as the dataset's own row numbers."""

    def __init__(self, sampler: TokenBudgetBatchSampler, rows: np.ndarray):
        self.sampler, self.rows = sampler, np.asarray(rows)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield self.rows[batch].tolist()

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def eval_shard(src_lengths: np.ndarray, tgt_lengths: np.ndarray, world: int, rank: int):
    """This rank's rows of an evaluation set split over `world` ranks: every world-th pair of
    the length order, so the shards hold every pair once and cost about the same to decode."""
    if len(src_lengths) < world:
        raise ValueError(
            f"the evaluation set has {len(src_lengths)} pairs, fewer than the {world} ranks"
        )
    order = np.lexsort((src_lengths, tgt_lengths))
    return np.sort(order[rank::world])
