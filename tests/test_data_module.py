"""TranslationDataModule: loaders, raw references, and exact mid-epoch resume through Lightning."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from seq2seq.config import CorpusConfig, DataConfig, TokenizerConfig
from seq2seq.data.batching import Batch
from seq2seq.data.datamodule import TranslationDataModule


@pytest.fixture(scope="module")
def cfg(multi30k_slice: Path) -> DataConfig:
    return DataConfig(
        root=str(multi30k_slice),
        train=CorpusConfig(src="train.en.gz", tgt="train.de.gz", max_pairs=400),
        valid=CorpusConfig(src="val.en.gz", tgt="val.de.gz"),
        test=CorpusConfig(src="test_2016_flickr.en.gz", tgt="test_2016_flickr.de.gz"),
        tokenizer=TokenizerConfig(vocab_size=500),
        max_tokens=300,
        seed=5,
    )


@pytest.fixture(scope="module")
def run_dir(cfg: DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dm-run")
    TranslationDataModule(cfg, run).prepare_data()
    return run


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(training=True, world_size=1, global_rank=0)


def _indices(loader, n: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch.index.tolist())
        if n is not None and len(out) == n:
            break
    return out


def test_eval_loaders_are_length_sorted_and_cover_the_raw_references(
    cfg: DataConfig, run_dir: Path
) -> None:
    dm = TranslationDataModule(cfg, run_dir)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert all(isinstance(b, Batch) for b in batches)
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(200))
    assert [b.tgt_out.shape[1] for b in batches] == sorted(b.tgt_out.shape[1] for b in batches)
    assert (
        len(dm.valid_references) == len(dm.valid_sources) == 200 and len(dm.test_references) == 200
    )
    assert dm.tokenizer.joint and dm.tokenizer.src_vocab_size == 500


def test_state_round_trip_resumes_at_the_batch_after_the_consumed_ones(
    cfg: DataConfig, run_dir: Path
) -> None:
    dm = TranslationDataModule(cfg, run_dir)
    dm.trainer = _fake_trainer()
    loader = dm.train_dataloader()
    full = _indices(loader)
    it = iter(loader)
    fetched = [next(it) for _ in range(4)]  # the loader runs one batch ahead of training
    for batch in fetched[:3]:
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert state["position"] == 3 and state["epoch"] == 0

    resumed = TranslationDataModule(cfg, run_dir)
    resumed.trainer = _fake_trainer()
    resumed.load_state_dict(state)
    assert _indices(resumed.train_dataloader()) == full[3:]


class _Recorder(L.LightningModule):
    """Trains an embedding on nothing useful; records which rows each step received."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(500, 4)
        self.seen: list[list[int]] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.index.tolist())
        return self.embedding(batch.src).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(max_steps: int, root: Path, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,  # never the working directory
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_lightning_resume_from_a_mid_epoch_checkpoint_continues_at_the_exact_next_batch(
    cfg: DataConfig, run_dir: Path, tmp_path: Path
) -> None:
    # A worker process makes the DataLoader draw batches from the sampler ahead of training.
    cfg = dataclasses.replace(cfg, num_workers=1)
    dm = TranslationDataModule(cfg, run_dir)
    dm.setup("fit")
    per_epoch = len(dm.train_dataloader())
    stop, total = per_epoch + 3, per_epoch + 8  # resume in the middle of the second epoch
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    straight = _Recorder()
    _trainer(total, tmp_path, [checkpoints]).fit(straight, datamodule=dm)
    assert len(straight.seen) == total

    resumed = _Recorder()
    ckpt = next(tmp_path.glob(f"*step={stop}.ckpt"))
    _trainer(total, tmp_path).fit(
        resumed, datamodule=TranslationDataModule(cfg, run_dir), ckpt_path=ckpt
    )
    assert resumed.seen == straight.seen[stop:]


@pytest.mark.parametrize(
    ("corpus", "named"),
    [
        (CorpusConfig(src="val.en", tgt="val.de"), "data.valid (val.en, val.de) line 8:"),
        (
            CorpusConfig(src="nt.en.sgm", tgt="nt.de.sgm"),
            "data.valid (nt.en.sgm, nt.de.sgm) segment 8 (counted in file order):",
        ),
        (CorpusConfig(dataset="wmt14", split="validation"), "data.valid (wmt14) row 8:"),
    ],
    ids=["text", "sgm", "dataset"],
)
def test_a_too_long_evaluation_pair_is_named_in_the_unit_its_file_counts(tmp_path, corpus, named):
    from seq2seq.data.datamodule import TranslationDataModule

    module = TranslationDataModule(DataConfig(valid=corpus), tmp_path)
    message = module._too_long("valid", "source", 7, 40, 32)
    assert message.startswith(named)
    assert message.endswith(
        "more than model.max_positions=32; raise model.max_positions or remove that "
        + named.split(") ")[1].split()[0]
    )


def test_row_tokens_packs_the_training_batches_and_leaves_validation_one_pair_a_row(
    cfg: DataConfig, run_dir: Path
) -> None:
    dm = TranslationDataModule(dataclasses.replace(cfg, row_tokens=150), run_dir)
    dm.setup("fit")
    dm.trainer = _fake_trainer()
    plain = TranslationDataModule(cfg, run_dir)
    plain.setup("fit")
    plain.trainer = _fake_trainer()
    packed_batch, plain_batch = (
        next(iter(dm.train_dataloader())),
        next(iter(plain.train_dataloader())),
    )
    assert packed_batch.rows is not None and plain_batch.rows is None
    assert packed_batch.index.tolist() == plain_batch.index.tolist()  # the same pairs
    assert packed_batch.src.size(0) < plain_batch.src.size(0)  # in fewer rows
    assert all(b.rows is None and b.src.size(0) == len(b.index) for b in dm.val_dataloader())


def test_ranks_started_together_prepare_the_data_one_at_a_time(
    cfg: DataConfig, tmp_path: Path
) -> None:
    """torchrun starts every rank at once and each calls prepare_data: while one holds the
    run directory's lock, another waits instead of training a second tokenizer beside it;
    once the lock is free it reuses what the first one prepared."""
    import threading
    import time

    from filelock import FileLock

    from seq2seq.data.pipeline import load_splits
    from seq2seq.rundir import PREPARE_LOCK

    run = tmp_path / "run"
    run.mkdir()
    done = threading.Event()
    other_rank = threading.Thread(
        target=lambda: (TranslationDataModule(cfg, run).prepare_data(), done.set())
    )
    with FileLock(run / PREPARE_LOCK):  # "rank 0" is preparing
        other_rank.start()
        time.sleep(1.0)
        assert not done.is_set() and not (run / "spm.model").exists()  # it waits
        load_splits(cfg, run)  # rank 0's preparation, inside its lock
    trained = (run / "spm.model").stat().st_mtime_ns
    other_rank.join(timeout=60)
    assert done.is_set()
    assert (run / "spm.model").stat().st_mtime_ns == trained  # reused, not trained again
