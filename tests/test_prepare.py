"""prepare(): the whole data path once, with a report for humans and for --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seq2seq.config import CorpusConfig, DataConfig, TokenizerConfig
from seq2seq.data.report import format_report, prepare


@pytest.fixture(scope="module")
def report(multi30k_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = DataConfig(
        root=str(multi30k_slice),
        train=CorpusConfig(src="train.en.gz", tgt="train.de.gz"),
        # The first training pairs again, so the overlap warning must fire.
        valid=CorpusConfig(src="train.en.gz", tgt="train.de.gz", max_pairs=5),
        test=CorpusConfig(src="test_2016_flickr.en.gz", tgt="test_2016_flickr.de.gz"),
        tokenizer=TokenizerConfig(vocab_size=800),
    )
    return prepare(cfg, tmp_path_factory.mktemp("prepare-run"))


def test_report_counts_pairs_vocab_tokens_and_lengths(report: dict) -> None:
    train = report["train"]
    assert train["read"] == 2000 and train["kept"] + sum(train["dropped"].values()) == 2000
    assert report["vocab"] == {"joint": True, "src": 800, "tgt": 800}
    assert set(report["splits"]) == {"train", "valid", "test"}
    stats = report["splits"]["train"]
    assert stats["pairs"] == train["kept"] and stats["src_pieces"] > stats["pairs"]
    lengths = stats["tgt_length"]
    assert list(lengths) == ["p50", "p90", "p99", "max"]
    assert lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"]
    json.dumps(report)  # --json prints it as is


def test_valid_sentences_seen_in_training_are_warned_about(report: dict) -> None:
    (warning,) = [w for w in report["warnings"] if w.startswith("valid:")]
    assert "5 of 5 source sentences also occur in the training data (5 as whole pairs)" in warning
    assert not any(w.startswith("test:") for w in report["warnings"])


def test_format_report_shows_counts_splits_and_warnings(report: dict) -> None:
    text = format_report(report)
    assert f"2000 read, {report['train']['kept']} kept" in text
    assert "joint 800" in text and "warning: valid: 5 of 5" in text
    assert any(line.startswith("test ") for line in text.splitlines())


def test_a_tokenizer_trained_on_other_data_or_settings_is_not_reused(multi30k_slice, tmp_path):
    """`prepare` of one corpus, then `prepare` (or `train`) of another in the same folder: the
    SentencePiece model beside them says what it was trained on, and the mismatch is named."""
    import dataclasses

    def data(**tokenizer) -> DataConfig:
        return DataConfig(
            root=str(multi30k_slice),
            train=CorpusConfig(src="train.en.gz", tgt="train.de.gz", max_pairs=600),
            valid=CorpusConfig(src="val.en.gz", tgt="val.de.gz", max_pairs=20),
            test=None,
            tokenizer=TokenizerConfig(vocab_size=300, **tokenizer),
        )

    run = tmp_path / "run"
    prepare(data(), run)
    written = json.loads((run / "spm.json").read_text())
    assert written["train"]["max_pairs"] == 600 and written["tokenizer"]["vocab_size"] == 300
    prepare(data(), run)  # the same inputs: reused
    other_corpus = dataclasses.replace(
        data(), train=CorpusConfig(src="train.en.gz", tgt="train.de.gz", max_pairs=500)
    )
    with pytest.raises(ValueError, match=r"trained with another data\.train\.max_pairs \("):
        prepare(other_corpus, run)
    with pytest.raises(ValueError, match=r"another data\.tokenizer\.model_type"):
        prepare(data(model_type="bpe"), run)


def test_a_corpus_weight_or_name_is_not_what_the_tokenizer_was_trained_on(multi30k_slice, tmp_path):
    """SentencePiece samples the pairs read, unweighted: a new weight (as a refusal of a too
    small one advises) reuses the model; a list names the corpus that differs."""
    import dataclasses

    def data(weight: float, max_pairs: int = 300) -> DataConfig:
        return DataConfig(
            root=str(multi30k_slice),
            train=[
                CorpusConfig(src="train.en.gz", tgt="train.de.gz", max_pairs=600),
                CorpusConfig(src="val.en.gz", tgt="val.de.gz", max_pairs=max_pairs, weight=weight),
            ],
            valid=CorpusConfig(src="val.en.gz", tgt="val.de.gz", max_pairs=20),
            test=None,
            tokenizer=TokenizerConfig(vocab_size=300),
        )

    run = tmp_path / "run"
    prepare(data(1.0), run)
    prepare(dataclasses.replace(data(2.0)), run)  # reused
    with pytest.raises(ValueError, match=r"another data\.train\[1\]\.max_pairs \("):
        prepare(data(1.0, max_pairs=200), run)
