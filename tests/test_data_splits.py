"""load_splits on a Multi30k slice: layout of the splits, cache reuse, worker processes."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

import seq2seq.data.readers
from seq2seq.config import CorpusConfig, DataConfig, TokenizerConfig
from seq2seq.data.pipeline import load_splits


def _cfg(root: Path, **overrides: object) -> DataConfig:
    return DataConfig(
        root=str(root),
        train=CorpusConfig(src="train.en.gz", tgt="train.de.gz"),
        valid=CorpusConfig(src="val.en.gz", tgt="val.de.gz"),
        test=CorpusConfig(src="test_2016_flickr.en.gz", tgt="test_2016_flickr.de.gz"),
        tokenizer=TokenizerConfig(vocab_size=1000),
        **overrides,
    )


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def prepared_run(multi30k_slice: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("run")
    return run, load_splits(_cfg(multi30k_slice), run)


def test_splits_have_ids_and_valid_test_keep_raw_text(prepared_run, multi30k_slice: Path) -> None:
    run, data = prepared_run
    assert data.train.column_names == ["src_ids", "tgt_ids"]
    assert data.report.read == 2000 and len(data.train) == data.report.kept > 1900
    assert (
        set(data.valid.column_names) == {"src", "tgt", "src_ids", "tgt_ids"}
        and len(data.test) == 200
    )
    with gzip.open(multi30k_slice / "val.de.gz", "rt", encoding="utf-8") as f:
        assert list(data.valid["tgt"]) == [line.strip() for line in f]
    assert data.valid[0]["src_ids"] == data.tokenizer.encode_src([data.valid[0]["src"]])[0]
    assert (run / "spm.model").exists() and data.tokenizer.src_vocab_size == 1000


def test_second_call_reuses_every_cache_file(prepared_run, multi30k_slice: Path) -> None:
    run, first = prepared_run
    before = _files(run)
    again = load_splits(_cfg(multi30k_slice), run)
    assert _files(run) == before  # nothing trained, read or tokenized again
    assert again.train.cache_files == first.train.cache_files
    assert again.train["tgt_ids"][:50] == first.train["tgt_ids"][:50]


def test_tokenizing_in_worker_processes_gives_the_same_ids(
    prepared_run, multi30k_slice: Path, monkeypatch
) -> None:
    run, first = prepared_run
    monkeypatch.setattr(seq2seq.data.readers, "MIN_ROWS_PER_PROC", 100)
    cfg = _cfg(multi30k_slice, num_proc=2, cache_dir=str(run / "cache-2proc"))
    two = load_splits(cfg, run)  # same run: the tokenizer is reused, the Arrow caches are new
    assert len(two.valid.cache_files) == 2  # one Arrow shard per worker process
    assert two.train["src_ids"][:] == first.train["src_ids"][:]
    assert two.valid["tgt_ids"][:] == first.valid["tgt_ids"][:]
