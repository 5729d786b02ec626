"""The LightningDataModule: data path in, token-budget DataLoaders out, resumable mid-epoch.

The trainer must be built with `use_distributed_sampler=False`: the batch sampler shards
across ranks itself (Lightning would otherwise try to wrap it in a DistributedSampler).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from seq2seq.config import DataConfig
from seq2seq.data.batching import (
    Batch,
    PairDataset,
    RowSubsetBatches,
    TokenBudgetBatchSampler,
    batch_lengths,
    collate,
    eval_shard,
)
from seq2seq.data.download import ensure_downloaded
from seq2seq.data.pipeline import PreparedData, load_splits
from seq2seq.data.readers import is_sgm
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.rundir import PREPARE_LOCK


class TranslationDataModule(L.LightningDataModule):
    """Tokenizer, tokenized splits and DataLoaders of one run.

    Its `state_dict()` (saved by Lightning in every checkpoint) holds the epoch and the number
    of training batches the model has actually received in it; restoring it makes the next
    `train_dataloader()` continue at exactly the following batch.

    Args:
        cfg: the recipe's data section.
        run_dir: the run folder (tokenizer model(s), Arrow caches by default).
    """

    def __init__(self, cfg: DataConfig, run_dir: str | os.PathLike) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.data: PreparedData | None = None
        self._train_sampler: TokenBudgetBatchSampler | None = None
        self._epoch, self._consumed = 0, 0
        self._resume: dict[str, int] | None = None
        self._texts: dict[tuple[str, str], list[str]] = {}

    # ---- preparing ------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (if configured), train the tokenizer and tokenize: once. Lightning calls
        this on local rank 0 only, but `train` calls it in every process, and ranks that a
        launcher started together (torchrun, srun) get there at once: a file lock in the run
        directory lets one prepare while the others wait, then find its work and reuse it
        (one tokenizer for all ranks, trained once). The splits it loaded are kept, so that
        `setup` and Lightning's own call of this hook in the same process load nothing again."""
        if self.data is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.run_dir / PREPARE_LOCK):
            ensure_downloaded(self.cfg)
            self.data = load_splits(self.cfg, self.run_dir)
            self._texts.clear()

    def setup(self, stage: str | None = None) -> None:
        """Load the prepared splits (memory-mapped caches) on every rank."""
        if self.data is None:
            self.data = load_splits(self.cfg, self.run_dir)
            self._texts.clear()

    @property
    def prepared(self) -> PreparedData:
        if self.data is None:
            self.setup()
        assert self.data is not None
        return self.data

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prepared.tokenizer

    @property
    def valid_sources(self) -> list[str]:
        """Raw validation source lines, by dataset row (`Batch.index`)."""
        return self._text("valid", "src")

    @property
    def valid_references(self) -> list[str]:
        """Raw validation reference lines, by dataset row (`Batch.index`), for BLEU."""
        return self._text("valid", "tgt")

    @property
    def test_sources(self) -> list[str]:
        """Raw test source lines, by dataset row (empty without a test split)."""
        return self._text("test", "src")

    @property
    def test_references(self) -> list[str]:
        """Raw test reference lines, by dataset row (empty without a test split)."""
        return self._text("test", "tgt")

    def _text(self, split: str, column: str) -> list[str]:
        if (split, column) not in self._texts:
            ds = getattr(self.prepared, split)
            self._texts[split, column] = [] if ds is None else list(ds[column])
        return self._texts[split, column]

    def check_positions(self, max_positions: int) -> None:
        """Fail before any training when a pair is longer than the model's positions: a long
        training pair would crash a step, a long validation pair every validation.

        Lengths are what the model sees: source pieces + EOS, BOS + target pieces.
        """
        for split in ("train", "valid", "test"):
            ds = getattr(self.prepared, split)
            if ds is None or len(ds) == 0:
                continue
            for side, lengths in zip(("source", "target"), batch_lengths(ds), strict=True):
                row = int(lengths.argmax())
                if lengths[row] > max_positions:
                    n = int(lengths[row])
                    raise ValueError(self._too_long(split, side, row, n, max_positions))

    def _too_long(self, split: str, side: str, row: int, n: int, max_positions: int) -> str:
        limit = f"more than model.max_positions={max_positions}"
        if split == "train":  # cleaned: rows are not lines
            return (
                f"data.train: a pair kept by cleaning has a {side} of {n} tokens, {limit}; set "
                f"data.clean.max_length to at most {max_positions - 1} or raise model.max_positions"
            )
        corpus = getattr(self.cfg, split)
        files = [f for f in (corpus.src, corpus.tgt, corpus.tsv, corpus.dataset) if f]
        # Rows are uncleaned: row i is line i + 1 of a text or TSV file, the (i + 1)-th <seg>
        # of a WMT .sgm file (seg ids restart per document), row i + 1 of a dataset.
        unit, where = "line", f"line {row + 1}"
        if corpus.dataset:
            unit, where = "row", f"row {row + 1}"
        elif corpus.src and is_sgm(corpus.src, corpus.tgt):
            unit, where = "segment", f"segment {row + 1} (counted in file order)"
        return (
            f"data.{split} ({', '.join(files)}) {where}: its {side} has {n} tokens, "
            f"{limit}; raise model.max_positions or remove that {unit}"
        )

    # ---- loaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled token-budget batches of this rank; resumes where `load_state_dict` says."""
        train, rows = self.prepared.train, self.prepared.train_rows
        world, rank = self._world()
        src_lengths, tgt_lengths = batch_lengths(train)
        if rows is not None:  # weighted corpora: the epoch's rows, some repeated
            src_lengths, tgt_lengths = src_lengths[rows], tgt_lengths[rows]
        sampler = TokenBudgetBatchSampler(
            src_lengths,
            tgt_lengths,
            self.cfg.max_tokens,
            shuffle=True,
            seed=self.cfg.seed,
            num_replicas=world,
            rank=rank,
        )
        if self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None
        self._train_sampler = sampler
        self._epoch, self._consumed = sampler.epoch, sampler.state_dict()["position"]
        batches = sampler if rows is None else RowSubsetBatches(sampler, rows)
        return self._loader(train, batches, row_tokens=self.cfg.row_tokens)

    def val_dataloader(self) -> DataLoader:
        """Validation batches sorted by length (fast decoding). Under DDP each rank decodes
        its share of the pairs (`eval_shard`); the module gathers the shares to score BLEU."""
        world, rank = self._world()
        valid = self.prepared.valid
        rows = None if world == 1 else eval_shard(*batch_lengths(valid), world, rank)
        return self._eval_loader(valid, rows)

    def test_dataloader(self) -> DataLoader:
        if self.prepared.test is None:
            raise ValueError("data.test is not set: there is no test split")
        return self._eval_loader(self.prepared.test)

    def _eval_loader(self, ds: Any, rows: np.ndarray | None = None) -> DataLoader:
        """Length-sorted batches of `ds`, or of its `rows` only (as the dataset's row numbers)."""
        src_lengths, tgt_lengths = batch_lengths(ds)
        if rows is not None:
            src_lengths, tgt_lengths = src_lengths[rows], tgt_lengths[rows]
        sampler = TokenBudgetBatchSampler(
            src_lengths, tgt_lengths, self.cfg.max_tokens, shuffle=False, num_replicas=1, rank=0
        )
        return self._loader(ds, sampler if rows is None else RowSubsetBatches(sampler, rows))

    def _loader(
        self,
        ds: Any,
        sampler: TokenBudgetBatchSampler | RowSubsetBatches,
        row_tokens: int | None = None,
    ) -> DataLoader:
        """Batches of `sampler`; with `row_tokens` (training only: validation decodes each
        row as one sentence) several pairs share a row."""
        workers = self.cfg.num_workers
        return DataLoader(
            PairDataset(ds),
            batch_sampler=sampler,
            collate_fn=collate if row_tokens is None else partial(collate, row_tokens=row_tokens),
            num_workers=workers,
            persistent_workers=False,
            # Its own generator: creating an iterator must not draw from torch's global RNG,
            # which dropout uses, or a resumed run's dropout masks would shift by one draw.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    # ---- exact resume ---------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Count training batches as the model receives them (the sampler runs ahead)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_sampler is not None:
            if self._train_sampler.epoch != self._epoch:
                self._epoch, self._consumed = self._train_sampler.epoch, 0
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: epoch and training batches consumed in it (this rank)."""
        if self._train_sampler is None:
            return {}
        state = self._train_sampler.state_dict()
        return {**state, "epoch": self._epoch, "position": self._consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next `train_dataloader()` continue after the consumed batches."""
        if state_dict:
            self._resume = dict(state_dict)
            self._epoch, self._consumed = state_dict["epoch"], state_dict["position"]
            if self._train_sampler is not None:  # the loader exists already: rewind it in place
                self._train_sampler.load_state_dict(self._resume)
                self._resume = None
