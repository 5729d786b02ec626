"""Token-budget batch sampler and collate: budget with padding, coverage, determinism, DDP, resume."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID
from seq2seq.data.batching import Batch, PairDataset, TokenBudgetBatchSampler, collate

N = 3001


@pytest.fixture(scope="module")
def lengths() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    src = rng.integers(2, 80, N)
    tgt = np.clip(src + rng.integers(-10, 10, N), 2, 90)
    return src, tgt


def _epoch(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_no_batch_exceeds_the_budget_counting_padding_on_both_sides(lengths) -> None:
    src, tgt = lengths
    for max_tokens in (200, 1000, 4096):
        batches = _epoch(TokenBudgetBatchSampler(src, tgt, max_tokens), 0)
        assert all(
            len(b) * src[b].max() <= max_tokens and len(b) * tgt[b].max() <= max_tokens
            for b in batches
        )


def test_every_pair_is_in_exactly_one_batch_per_epoch(lengths) -> None:
    sampler = TokenBudgetBatchSampler(*lengths, 1000, seed=3)
    for epoch in (0, 1):
        indices = [i for b in _epoch(sampler, epoch) for i in b]
        assert sorted(indices) == list(range(N))


def test_epochs_differ_and_seed_plus_epoch_fix_the_order(lengths) -> None:
    a, b = (
        TokenBudgetBatchSampler(*lengths, 1000, seed=3),
        TokenBudgetBatchSampler(*lengths, 1000, seed=3),
    )
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 1) == _epoch(b, 1) and _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(TokenBudgetBatchSampler(*lengths, 1000, seed=4), 1) != _epoch(a, 1)


def test_unshuffled_batches_follow_length_order(lengths) -> None:
    src, tgt = lengths
    batches = _epoch(TokenBudgetBatchSampler(src, tgt, 1000, shuffle=False), 5)
    longest = [tgt[b].max() for b in batches]
    assert longest == sorted(longest)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_complete_and_equal_in_length(lengths, world: int) -> None:
    shards = [
        _epoch(TokenBudgetBatchSampler(*lengths, 500, seed=1, num_replicas=world, rank=r), 2)
        for r in range(world)
    ]
    n_global = len(_epoch(TokenBudgetBatchSampler(*lengths, 500, seed=1), 2))
    assert {len(shard) for shard in shards} == {
        len(TokenBudgetBatchSampler(*lengths, 500, num_replicas=world))
    }
    n_repeats = len(shards[0]) * world - n_global
    assert 0 <= n_repeats < world
    # Dealt round-robin: the global order is shards[0][0], shards[1][0], ...; the tail repeats
    # the first batches of the epoch so that every rank gets as many.
    dealt = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    assert dealt[n_global:] == dealt[:n_repeats]
    counts = Counter(i for b in dealt[:n_global] for i in b)
    assert sorted(counts) == list(range(N)) and set(counts.values()) == {1}  # disjoint and complete


def test_world_size_that_divides_the_batches_repeats_nothing() -> None:
    sampler = TokenBudgetBatchSampler(np.full(12, 10), np.full(12, 10), 20, num_replicas=3, rank=0)
    assert len(sampler) == 2  # 6 batches of 2 pairs, dealt to 3 ranks
    everything = [
        i
        for r in range(3)
        for b in TokenBudgetBatchSampler(
            np.full(12, 10), np.full(12, 10), 20, num_replicas=3, rank=r
        )
        for i in b
    ]
    assert sorted(everything) == list(range(12))


def test_sampler_restored_mid_epoch_yields_exactly_the_remaining_batches(lengths) -> None:
    first = TokenBudgetBatchSampler(*lengths, 1000, seed=7, num_replicas=2, rank=1)
    first.set_epoch(4)
    it = iter(first)
    seen = [next(it) for _ in range(5)]
    resumed = TokenBudgetBatchSampler(*lengths, 1000, seed=7, num_replicas=2, rank=1)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(4)  # Lightning sets the epoch again before iterating
    full = _epoch(TokenBudgetBatchSampler(*lengths, 1000, seed=7, num_replicas=2, rank=1), 4)
    assert seen + list(resumed) == full
    assert _epoch(resumed, 5) == _epoch(first, 5)  # the next epoch starts from its beginning


def test_a_pair_longer_than_the_budget_gets_a_batch_by_itself(caplog) -> None:
    src = np.array([5, 5, 300, 5, 5])
    tgt = np.array([5, 5, 6, 5, 400])
    with caplog.at_level(logging.WARNING):
        batches = _epoch(TokenBudgetBatchSampler(src, tgt, 100), 0)
    assert "2 pairs exceed max_tokens=100" in caplog.text
    assert [2] in batches and [4] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]


def test_collate_pads_with_zero_and_adds_bos_and_eos() -> None:
    batch = collate([(7, [10, 11, EOS_ID], [20]), (3, [12, EOS_ID], [21, 22, 23])])
    assert batch.src.tolist() == [[10, 11, EOS_ID], [12, EOS_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 20, PAD_ID, PAD_ID], [BOS_ID, 21, 22, 23]]
    assert batch.tgt_out.tolist() == [[20, EOS_ID, PAD_ID, PAD_ID], [21, 22, 23, EOS_ID]]
    assert batch.index.tolist() == [7, 3] and batch.src.dtype == torch.long
    assert (batch.n_src_tokens, batch.n_tgt_tokens) == (5, 6)
    assert batch.n_tgt_tokens == int((batch.tgt_out != PAD_ID).sum())
    # the real target tokens' flat positions (row * T + column), found on the host
    assert batch.tgt_positions.tolist() == [0, 1, 4, 5, 6, 7]
    assert batch.tgt_out.flatten()[batch.tgt_positions].tolist() == [20, EOS_ID, 21, 22, 23, EOS_ID]
    assert batch.src_positions.tolist() == [0, 1, 2, 3, 4]  # and the real source tokens
    assert batch.src.flatten()[batch.src_positions].tolist() == [10, 11, EOS_ID, 12, EOS_ID]


@pytest.mark.parametrize("row_tokens", [None, 8])
def test_lightning_moves_a_batch_with_its_to_method(row_tokens) -> None:
    batch = collate([(0, [10, EOS_ID], [20]), (1, [11, EOS_ID], [21])], row_tokens)
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and moved.src.is_meta and moved.index.is_meta
    assert moved.src_positions.is_meta and moved.tgt_positions.is_meta
    assert moved.n_tgt_tokens == batch.n_tgt_tokens and not batch.src.is_meta
    if row_tokens is not None:  # the rows' sentence numbers and positions go along
        assert all(t.is_meta for t in vars(moved.rows).values())


def test_dataloader_batches_stay_within_budget_on_real_data(joint_tokenizer, slice_lines) -> None:
    from datasets import Dataset

    ds = Dataset.from_dict(
        {
            "src_ids": joint_tokenizer.encode_src(slice_lines[0]),
            "tgt_ids": joint_tokenizer.encode_tgt(slice_lines[1]),
        }
    )
    src_len = np.array([len(x) for x in ds["src_ids"]])
    tgt_len = np.array([len(x) + 1 for x in ds["tgt_ids"]])
    sampler = TokenBudgetBatchSampler(src_len, tgt_len, 600)
    loader = DataLoader(PairDataset(ds), batch_sampler=sampler, collate_fn=collate)
    _set_sampler_epoch(loader, 2)  # what Lightning does at every epoch start
    assert sampler.epoch == 2
    seen = []
    for batch, expected in zip(loader, list(sampler), strict=True):
        assert batch.src.numel() <= 600 and batch.tgt_in.numel() <= 600
        assert batch.index.tolist() == expected
        assert (
            batch.src[0, : len(ds[expected[0]]["src_ids"])].tolist() == ds[expected[0]]["src_ids"]
        )
        seen += expected
    assert sorted(seen) == list(range(len(ds)))


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shards_hold_every_pair_once_and_cost_about_the_same(world: int) -> None:
    from seq2seq.data.batching import eval_shard

    rng = np.random.default_rng(5)
    src, tgt = rng.integers(1, 60, 1001), rng.integers(1, 60, 1001)
    shards = [eval_shard(src, tgt, world, rank) for rank in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(1001))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    costs = [int(tgt[shard].sum()) for shard in shards]  # dealt in length order: balanced
    assert max(costs) - min(costs) <= 60
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        eval_shard(src[:3], tgt[:3], 4, 0)


def test_one_cutter_bounds_padded_tokens_or_real_target_tokens():
    from seq2seq.data.batching import cut

    rng = np.random.default_rng(5)
    src, tgt = rng.integers(1, 30, 400), rng.integers(1, 30, 400)
    order = np.argsort(tgt, kind="stable")
    for budget in ("padded", "target"):
        batches = cut(order, src, tgt, 120, budget)
        assert np.concatenate(batches).tolist() == order.tolist()  # every row once, in order
        for b in batches:
            used = len(b) * max(src[b].max(), tgt[b].max()) if budget == "padded" else tgt[b].sum()
            assert used <= 120 or len(b) == 1
    with pytest.raises(ValueError, match="budget must be"):
        cut(order, src, tgt, 120, "words")


def _greedy_reference(src, tgt, max_tokens, budget):
    """The cutter's rule, one row at a time: add the next row unless that passes the budget."""
    ends, n, longest, total = [], 0, 0, 0
    for i, (s, t) in enumerate(zip(src.tolist(), tgt.tolist(), strict=True)):
        grown = max(longest, s, t)
        over = (n + 1) * grown > max_tokens if budget == "padded" else total + t > max_tokens
        if n and over:
            ends.append(i)
            n, grown, total = 0, max(s, t), 0
        n, longest, total = n + 1, grown, total + t
    return ends + ([len(src)] if n else [])


@pytest.mark.parametrize("budget", ["padded", "target"])
def test_the_vectorized_cutter_cuts_where_the_row_by_row_rule_does(budget):
    from seq2seq.data.batching import pack

    rng = np.random.default_rng(11)
    for trial in range(30):
        n = int(rng.integers(0, 3000))
        src, tgt = rng.integers(1, 200, n), rng.integers(0, 200, n)
        if trial % 3 == 0:  # sorted, as training cuts them
            order = np.lexsort((src, tgt))
            src, tgt = src[order], tgt[order]
        max_tokens = int(rng.choice([1, 50, 150, 1000, 4096]))
        assert pack(src, tgt, max_tokens, budget) == _greedy_reference(src, tgt, max_tokens, budget)
