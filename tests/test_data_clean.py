"""Cleaning: each dropped pair is counted once, under the first filter that rejects it."""

from __future__ import annotations

from pathlib import Path

import pytest

from seq2seq.config import CleanConfig, CorpusConfig, DataConfig, TokenizerConfig
from seq2seq.data.pipeline import clean, load_splits, tokenize
from seq2seq.data.readers import DataError, read_corpus

LONG = " ".join(["A brown dog runs across the green grass"] * 4)
PAIRS = [
    ("A dog runs.", "Ein Hund rennt."),  # kept
    ("   ", "Ein Hund."),  # empty source after stripping
    ("", ""),  # empty and identical: counted as empty only
    ("Berlin", "Berlin"),  # identical
    (LONG, "Ein Hund."),  # too long (and a bad ratio): counted as too long
    ("Hi.", "Ein kleiner Junge in einem roten Hemd spielt im Garten mit einem Ball."),  # ratio
    ("A dog runs.", "Ein Hund rennt."),  # duplicate of the first pair
    ("A cat sleeps.", "Eine Katze schläft."),  # kept
]


def _write_pairs(folder: Path, pairs: list[tuple[str, str]]) -> None:
    (folder / "c.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / "c.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture
def tokenized(tmp_path: Path, joint_tokenizer):
    _write_pairs(tmp_path, PAIRS)
    raw = read_corpus(
        CorpusConfig(src="c.en", tgt="c.de"), DataConfig(root=str(tmp_path)), tmp_path / "cache"
    )
    return tokenize(raw, joint_tokenizer, keep_text=False, cache_dir=tmp_path / "cache")


def test_report_counts_each_drop_under_its_first_filter(tokenized, joint_tokenizer) -> None:
    long_pieces = len(joint_tokenizer.encode_src([LONG])[0]) - 1
    assert long_pieces > 20  # the premise of the too_long row
    keep, report = clean(
        tokenized, CleanConfig(max_length=20, max_ratio=3.0, dedup=True, drop_identical=True)
    )
    assert report.read == 8 and report.kept == 2
    assert report.dropped == {"empty": 2, "identical": 1, "too_long": 1, "ratio": 1, "duplicate": 1}
    assert keep.tolist() == [0, 7]


def test_disabled_filters_keep_their_pairs_and_are_not_reported(tokenized) -> None:
    keep, report = clean(
        tokenized, CleanConfig(max_length=0, max_ratio=0, dedup=False, drop_identical=False)
    )
    assert report.dropped == {"empty": 2}
    assert keep.tolist() == [0, 3, 4, 5, 6, 7]


def test_empty_corpus_after_cleaning_names_the_filter(tmp_path: Path, joint_tokenizer) -> None:
    _write_pairs(tmp_path, [("Berlin", "Berlin"), ("Paris", "Paris"), ("", "x")])
    (tmp_path / "spm.model").write_bytes(
        joint_tokenizer.to_state()["src_model"]
    )  # reused, not trained
    cfg = DataConfig(
        root=str(tmp_path),
        train=CorpusConfig(src="c.en", tgt="c.de"),
        valid=CorpusConfig(src="c.en", tgt="c.de"),
        tokenizer=TokenizerConfig(vocab_size=joint_tokenizer.src_vocab_size),
    )
    with pytest.raises(DataError, match=r"dropped all 3 pairs \(empty: 1, identical: 2\)") as info:
        load_splits(cfg, tmp_path)
    assert "\n" not in str(info.value)
