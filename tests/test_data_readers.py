"""Readers: every format gives the same pairs; bad input fails with one line naming file and line."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import datasets
import pytest

from seq2seq.config import CorpusConfig, DataConfig
from seq2seq.data.readers import DataError, read_corpus

PAIRS = [
    ("A man in an orange hat.", "Ein Mann mit einem orangen Hut."),
    ("  Two dogs play in the snow.  ", "Zwei Hunde spielen im Schnee."),
    ("Ünïcödé: «quotes» and — dashes", "Größe & Maß „Anführungszeichen“"),
    ("A girl\u2028with a line separator\x85inside.", "Ein Mädchen."),
    ("Last line.", "Letzte Zeile."),
]
EXPECTED = [(s.strip(), t.strip()) for s, t in PAIRS]
OPENERS = {"": open, ".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _write(path: Path, lines: list[str]) -> Path:
    with OPENERS[path.suffix if path.suffix in OPENERS else ""](path, "wb") as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def _read(tmp_path: Path, **corpus: object) -> list[tuple[str, str]]:
    ds = read_corpus(CorpusConfig(**corpus), DataConfig(root=str(tmp_path)), tmp_path / "cache")
    return list(zip(ds["src"], ds["tgt"], strict=True))


def _error(tmp_path: Path, **corpus: object) -> str:
    with pytest.raises(DataError) as info:
        _read(tmp_path, **corpus)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".bz2"])
def test_plain_and_compressed_files_give_the_same_stripped_pairs(
    tmp_path: Path, suffix: str
) -> None:
    _write(tmp_path / f"x.en{suffix}", [s for s, _ in PAIRS])
    _write(tmp_path / f"x.de{suffix}", [t for _, t in PAIRS])
    assert _read(tmp_path, src=f"x.en{suffix}", tgt=f"x.de{suffix}") == EXPECTED


def test_tsv_gives_the_same_pairs_with_chosen_columns(tmp_path: Path) -> None:
    _write(tmp_path / "x.tsv", [f"{i}\t{t}\t{s}" for i, (s, t) in enumerate(PAIRS)])
    assert _read(tmp_path, tsv="x.tsv", tsv_columns=(2, 1)) == EXPECTED


def _sgm(lines: list[str], docs: tuple[str, ...] = ("d1", "d2")) -> list[str]:
    out = ['<srcset setid="t" srclang="any">']
    half = len(lines) // 2
    for doc, chunk, start in ((docs[0], lines[:half], 1), (docs[1], lines[half:], 1)):
        out += [f'<doc sysid="ref" docid="{doc}" genre="news">', "<p>"]
        out += [f'<seg id="{start + i}">{line}</seg>' for i, line in enumerate(chunk)]
        out += ["</p>", "</doc>"]
    return [*out, "</srcset>"]


def test_wmt_sgml_source_and_reference_give_the_same_pairs(tmp_path: Path) -> None:
    _write(tmp_path / "t-src.en.sgm", _sgm([s for s, _ in PAIRS]))
    _write(tmp_path / "t-ref.de.sgm.gz", _sgm([t for _, t in PAIRS]))
    # Like sacrebleu, segments get their whitespace runs collapsed (U+2028 and U+0085 included).
    collapsed = [(" ".join(s.split()), " ".join(t.split())) for s, t in EXPECTED]
    assert _read(tmp_path, src="t-src.en.sgm", tgt="t-ref.de.sgm.gz") == collapsed


@pytest.mark.parametrize("layout", ["translation", "columns", "dataset_dict"])
def test_local_saved_dataset_gives_the_same_pairs(tmp_path: Path, layout: str) -> None:
    if layout == "translation":
        ds = datasets.Dataset.from_dict({"translation": [{"de": t, "en": s} for s, t in PAIRS]})
    else:
        ds = datasets.Dataset.from_dict({"en": [s for s, _ in PAIRS], "de": [t for _, t in PAIRS]})
    if layout == "dataset_dict":
        ds = datasets.DatasetDict({"validation": ds})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _read(tmp_path, dataset="saved", split="validation") == EXPECTED


def test_max_pairs_keeps_the_first_pairs(tmp_path: Path) -> None:
    _write(tmp_path / "x.en", [s for s, _ in PAIRS])
    _write(tmp_path / "x.de", [t for _, t in PAIRS])
    assert _read(tmp_path, src="x.en", tgt="x.de", max_pairs=2) == EXPECTED[:2]


@pytest.mark.parametrize(("n_src", "n_tgt"), [(5, 4), (4, 5)])
def test_line_count_mismatch_names_both_files_and_counts(
    tmp_path: Path, n_src: int, n_tgt: int
) -> None:
    _write(tmp_path / "x.en.gz", [s for s, _ in PAIRS][:n_src])
    _write(tmp_path / "x.de", [t for _, t in PAIRS][:n_tgt])
    message = _error(tmp_path, src="x.en.gz", tgt="x.de")
    assert f"{tmp_path / 'x.en.gz'} has {n_src} lines" in message
    assert f"{tmp_path / 'x.de'} has {n_tgt} lines" in message


def test_missing_file_is_named_with_its_config_key(tmp_path: Path) -> None:
    _write(tmp_path / "x.en", ["a"])
    message = _error(tmp_path, src="x.en", tgt="nope.de")
    assert "data.train.tgt" in message and str(tmp_path / "nope.de") in message


def test_undecodable_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "x.en", ["a", "b", "c", "d"])
    with gzip.open(tmp_path / "x.de.gz", "wb") as f:
        f.write(b"eins\nzwei\ndr\xffei\nvier\n")
    message = _error(tmp_path, src="x.en", tgt="x.de.gz")
    assert f"{tmp_path / 'x.de.gz'}: line 3:" in message and "UTF-8" in message


def test_tsv_line_with_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "x.tsv", ["a\tb", "c\td", "e\tf", "g\th\ti", "j\tk"])
    message = _error(tmp_path, tsv="x.tsv")
    assert f"{tmp_path / 'x.tsv'}: line 4: 3 tab-separated columns, expected 2" in message


@pytest.mark.parametrize("split", ["train", "valid"])
def test_a_negative_tsv_column_is_refused_naming_the_key(split: str) -> None:
    """Not a DatasetGenerationError while reading: the reader's range check counts from 0."""
    with pytest.raises(ValueError) as info:
        DataConfig(**{split: CorpusConfig(tsv="x.tsv", tsv_columns=(-5, 1))})
    assert str(info.value) == f"data.{split}.tsv_columns=[-5, 1] must be column numbers >= 0"


def test_misaligned_sgml_segments_name_both_files_and_lines(tmp_path: Path) -> None:
    _write(tmp_path / "a.sgm", _sgm(["x", "y", "z", "w"]))
    _write(tmp_path / "b.sgm", _sgm(["x", "y", "z", "w"], docs=("d1", "other")))
    message = _error(tmp_path, src="a.sgm", tgt="b.sgm")
    assert "do not align" in message and "line 10" in message and "'other'" in message


def test_unreachable_hub_dataset_fails_in_one_line(tmp_path: Path) -> None:
    message = _error(tmp_path, dataset="wmt14", dataset_config="de-en", split="validation")
    assert "wmt14" in message and "hub" in message


def test_exactly_one_source_kind_is_required(tmp_path: Path) -> None:
    assert "exactly one of" in _error(tmp_path, src="x.en", tgt="x.de", tsv="x.tsv")


def test_a_file_named_for_another_language_than_its_side_is_pointed_out() -> None:
    """`--data.tgt_lang fr` leaves the recipe's `train.de.gz`: the files decide the language,
    so each file named for another one is a line naming its key (compression and .sgm
    stripped; a region subtag ignored; names without a two-letter code say nothing)."""
    from seq2seq.data.readers import language_mismatches

    cfg = DataConfig(
        src_lang="pt_BR",
        tgt_lang="fr",
        train=[
            CorpusConfig(src="a.pt.gz", tgt="a.de.gz"),
            CorpusConfig(src="b.src", tgt="b.tgt"),
            CorpusConfig(tsv="c.tsv"),
        ],
        valid=CorpusConfig(src="newstest.pt.sgm", tgt="newstest.fr.sgm.xz"),
        test=CorpusConfig(src="test.en", tgt="test.fra"),
    )
    assert language_mismatches(cfg) == [
        "data.train[0].tgt: a.de.gz is named '.de', but data.tgt_lang is 'fr': the files decide "
        "the language; point data.train[0].tgt at the 'fr' file, or set data.tgt_lang",
        "data.test.src: test.en is named '.en', but data.src_lang is 'pt_BR': the files decide "
        "the language; point data.test.src at the 'pt_BR' file, or set data.src_lang",
    ]
    assert language_mismatches(DataConfig(valid=CorpusConfig(src="v.en", tgt="v.de"))) == []


def test_load_splits_warns_of_a_file_named_for_another_language(tmp_path, caplog) -> None:
    from seq2seq.data.pipeline import load_splits

    cfg = DataConfig(root=str(tmp_path), tgt_lang="fr", train=CorpusConfig(src="t.en", tgt="t.de"))
    with caplog.at_level("WARNING"), pytest.raises(DataError, match="file not found"):
        load_splits(cfg, tmp_path / "run")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "data.train.tgt: t.de is named '.de', but data.tgt_lang is 'fr': the files decide the "
        "language; point data.train.tgt at the 'fr' file, or set data.tgt_lang"
    ]
