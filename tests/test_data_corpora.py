"""Several training corpora in one recipe: read each, clean and deduplicate them together,
report each, weight each in the epoch; bad lists name the corpus and the key."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from seq2seq.cli import main
from seq2seq.config import CleanConfig, CorpusConfig, DataConfig, TokenizerConfig
from seq2seq.data.pipeline import epoch_rows, load_splits
from seq2seq.data.readers import DataError
from seq2seq.recipe import RecipeError, load_recipe

RAW_RECIPE = Path(__file__).parents[1] / "recipes" / "wmt14_en_de_base_raw.yaml"


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _sgm(lines: list[str], kind: str) -> list[str]:
    head = f'<{kind} setid="newstest2014" srclang="any">'
    segs = [f'<seg id="{i}">{line}</seg>' for i, line in enumerate(lines, 1)]
    return [head, '<doc sysid="ref" docid="d1" genre="news" origlang="en">', *segs, "</doc>"]


@pytest.fixture(scope="module")
def three_corpora(slice_lines, tmp_path_factory) -> tuple[Path, DataConfig]:
    """The slice's 2,000 pairs in three corpora; the third repeats 20 pairs of the first."""
    en, de = slice_lines
    root = tmp_path_factory.mktemp("corpora")
    parts = {"a": (0, 1000), "b": (1000, 1500), "c": (1500, 2000)}
    for name, (lo, hi) in parts.items():
        extra = range(20) if name == "c" else range(0)
        _write(root / f"{name}.en", en[lo:hi] + [en[i] for i in extra])
        _write(root / f"{name}.de", de[lo:hi] + [de[i] for i in extra])
    _write(root / "val.en", en[:50])
    _write(root / "val.de", de[:50])
    cfg = DataConfig(
        root=str(root),
        train=[
            CorpusConfig(src="a.en", tgt="a.de", weight=2.0),
            CorpusConfig(src="b.en", tgt="b.de", name="second"),
            CorpusConfig(src="c.en", tgt="c.de", weight=0.5),
        ],
        valid=CorpusConfig(src="val.en", tgt="val.de"),
        tokenizer=TokenizerConfig(vocab_size=1000),
        clean=CleanConfig(dedup=True),
    )
    return root, cfg


@pytest.fixture(scope="module")
def prepared_run(three_corpora, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return run, load_splits(three_corpora[1], run)


@pytest.fixture(scope="module")
def prepared(prepared_run):
    return prepared_run[1]


def test_each_corpus_is_reported_and_duplicates_across_corpora_are_dropped(prepared):
    report = prepared.report
    assert report.read == 2020 and len(prepared.train) == report.kept
    names = [c["name"] for c in report.corpora]
    assert names == ["a.en", "second", "c.en"]
    assert [c["key"] for c in report.corpora] == [f"data.train[{i}]" for i in range(3)]
    assert [c["read"] for c in report.corpora] == [1000, 500, 520]
    assert sum(c["kept"] for c in report.corpora) == report.kept
    for filter_name, dropped in report.dropped.items():
        assert sum(c["dropped"][filter_name] for c in report.corpora) == dropped
    # The 20 pairs the third corpus repeats from the first are its duplicates (and maybe more).
    assert report.corpora[2]["dropped"]["duplicate"] >= 20


def test_weights_repeat_or_thin_each_corpus_in_the_epoch(prepared):
    kept = [c["kept"] for c in prepared.report.corpora]
    assert [c["epoch_pairs"] for c in prepared.report.corpora] == [
        2 * kept[0],
        kept[1],
        round(0.5 * kept[2]),
    ]
    rows = prepared.train_rows
    counts = Counter(rows.tolist())
    assert set(counts.values()) <= {1, 2} and len(rows) == sum(
        c["epoch_pairs"] for c in prepared.report.corpora
    )
    assert all(counts[r] == 2 for r in range(kept[0]))  # every pair of the first, twice


def test_the_training_loader_serves_the_weighted_epoch(three_corpora, prepared, tmp_path):
    from seq2seq.data.datamodule import TranslationDataModule

    module = TranslationDataModule(three_corpora[1], tmp_path)
    module._prepared = prepared
    seen = Counter(i for batch in module.train_dataloader() for i in batch.index.tolist())
    assert seen == Counter(prepared.train_rows.tolist())


def test_a_second_load_reuses_the_caches_of_the_concatenated_corpora(three_corpora, prepared_run):
    run, first = prepared_run
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = load_splits(three_corpora[1], run)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files
    assert again.train.cache_files == first.train.cache_files
    assert np.array_equal(again.train_rows, first.train_rows)


def test_epoch_rows_is_none_when_every_weight_is_one_and_seeded_otherwise():
    corpus_of = np.array([0, 0, 1, 1, 1, 1])
    assert epoch_rows(corpus_of, [1.0, 1.0], seed=1) is None
    first = epoch_rows(corpus_of, [1.0, 0.5], seed=1)
    assert np.array_equal(first, epoch_rows(corpus_of, [1.0, 0.5], seed=1))
    assert first[:2].tolist() == [0, 1] and len(first) == 4


def test_the_raw_wmt14_recipe_prepares_stand_in_files_of_the_same_names(
    slice_lines, tmp_path, capsys
):
    """recipes/wmt14_en_de_base_raw.yaml on tiny files named and formatted like the unpacked
    WMT14 archives: three corpora, newstest2013 plain text, newstest2014 SGML."""
    en, de = slice_lines
    recipe = yaml.safe_load(RAW_RECIPE.read_text())
    for i, corpus in enumerate(recipe["data"]["train"]):
        lo = 600 * i
        _write(tmp_path / corpus["src"], en[lo : lo + 600])
        _write(tmp_path / corpus["tgt"], de[lo : lo + 600])
    _write(tmp_path / recipe["data"]["valid"]["src"], en[1800:1900])
    _write(tmp_path / recipe["data"]["valid"]["tgt"], de[1800:1900])
    _write(tmp_path / recipe["data"]["test"]["src"], _sgm(en[1900:], "srcset"))
    _write(tmp_path / recipe["data"]["test"]["tgt"], _sgm(de[1900:], "refset"))
    args = ["prepare", str(RAW_RECIPE), "--data.root", str(tmp_path), "--json"]
    args += ["--data.tokenizer.vocab_size", "800", "--data.num_proc", "1"]
    assert main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    corpora = report["train"]["corpora"]
    assert [c["name"] for c in corpora] == ["europarl", "commoncrawl", "news-commentary"]
    assert [c["read"] for c in corpora] == [600, 600, 600]
    assert report["splits"]["valid"]["pairs"] == 100 and report["splits"]["test"]["pairs"] == 100
    from seq2seq.data.report import format_report

    lines = format_report(report).splitlines()
    assert any(line.strip().startswith("commoncrawl (data.train[1])  600 read,") for line in lines)


def _recipe(tmp_path: Path, train: object) -> str:
    path = tmp_path / "r.yaml"
    data = {"root": str(tmp_path), "train": train, "valid": {"src": "v.en", "tgt": "v.de"}}
    path.write_text(yaml.safe_dump({"data": data}))
    return str(path)


@pytest.mark.parametrize(
    "train, message",
    [
        (
            [{"src": "a", "tgt": "b", "weight": 0}],
            "data.train[0].weight=0.0 must be a finite number above 0",
        ),
        (
            [{"src": "a", "tgt": "b", "weight": -1}],
            "data.train[0].weight=-1.0 must be a finite number above 0",
        ),
        (
            [{"src": "a", "tgt": "b"}, {"src": "a", "tgt": "c", "weight": float("inf")}],
            "data.train[1].weight=inf must be a finite number above 0",
        ),
        (
            [{"src": "a", "tgt": "b"}, {"src": "a", "tgt": "c", "weight": "x"}],
            "data.train[1].weight='x' is not a number",
        ),
        ([{"src": "a", "tgt": "b", "wieght": 2}], "data.train[0] has no key 'wieght'"),
        ([{"src": "a", "tgt": "b"}, "c.en"], "data.train[1] must be a corpus (a mapping)"),
        (
            [{"src": "x/a", "tgt": "b"}, {"src": "y/a", "tgt": "c"}],
            "data.train[1] and data.train[0] are both named 'a'",
        ),
        ([], "data.train is an empty list"),
    ],
    ids=[
        "zero",
        "negative",
        "infinite",
        "not-a-number",
        "unknown-key",
        "not-a-mapping",
        "same-name",
        "empty",
    ],
)
def test_a_bad_corpus_list_is_refused_naming_the_key(tmp_path, train, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, train))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_weight_that_gives_a_corpus_no_pair_is_refused_before_a_tokenizer_is_trained(
    three_corpora, tmp_path
):
    """Not numpy's "need at least one array to concatenate", nor silently 0 pairs per epoch."""
    root, cfg = three_corpora
    train = [
        CorpusConfig(src="a.en", tgt="a.de"),
        CorpusConfig(src="b.en", tgt="b.de", weight=1e-4),
    ]
    with pytest.raises(DataError) as err:
        load_splits(dataclasses.replace(cfg, train=train), tmp_path)
    assert str(err.value) == (
        "data.train[1].weight=0.0001 gives 0 of its 500 read pairs to an epoch; "
        "a weight of 1/500 = 0.002 gives one"
    )
    assert not list(tmp_path.glob("spm*"))


def test_a_weight_that_would_exhaust_memory_is_refused_before_a_tokenizer_is_trained(
    three_corpora, tmp_path
):
    """1e12 (a slip for 1e-2, say) would build an epoch of 5e14 row numbers."""
    root, cfg = three_corpora
    train = [
        CorpusConfig(src="a.en", tgt="a.de"),
        CorpusConfig(src="b.en", tgt="b.de", weight=1e12),
    ]
    with pytest.raises(DataError) as err:
        load_splits(dataclasses.replace(cfg, train=train), tmp_path)
    assert str(err.value) == (
        "data.train[1].weight=1000000000000.0 x 500 read pairs = 5e+14 pairs per epoch, more "
        "than 2,147,483,647; lower it"
    )
    assert not list(tmp_path.glob("spm*"))


def test_a_weight_that_gives_no_pair_of_those_cleaning_kept_is_refused(
    slice_lines, three_corpora, tmp_path
):
    """1000 pairs read give one at weight 0.001; the 4 that cleaning keeps give none."""
    en, de = slice_lines
    root, cfg = three_corpora
    _write(tmp_path / "d.en", en[1000:])
    _write(tmp_path / "d.de", en[1000:1996] + de[1996:])  # source == target: dropped but 4
    train = [
        CorpusConfig(src=str(root / "a.en"), tgt=str(root / "a.de")),
        CorpusConfig(src=str(tmp_path / "d.en"), tgt=str(tmp_path / "d.de"), weight=0.001),
    ]
    with pytest.raises(DataError) as err:
        load_splits(dataclasses.replace(cfg, train=train), tmp_path / "run")
    assert str(err.value) == (
        "data.train[1].weight=0.001 gives 0 of its 4 kept pairs to an epoch; "
        "a weight of 1/4 = 0.25 gives one"
    )


def test_a_missing_file_in_the_list_names_the_corpus_and_the_file(three_corpora, tmp_path, capsys):
    root, _ = three_corpora
    train = [{"src": "a.en", "tgt": "a.de"}, {"src": "b.en", "tgt": "nope.de"}]
    path = tmp_path / "r.yaml"
    data = {"root": str(root), "train": train, "valid": {"src": "val.en", "tgt": "val.de"}}
    path.write_text(yaml.safe_dump({"data": data}))
    assert main(["prepare", str(path), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()  # before reading the first corpus: no progress bar
    assert err.count("\n") == 0 and "data.train[1].tgt: file not found" in err
    assert str(root / "nope.de") in err


def test_a_misaligned_corpus_in_the_list_is_named(three_corpora, tmp_path, capsys):
    root, _ = three_corpora
    _write(tmp_path / "short.de", ["eins", "zwei"])
    train = [
        {"src": "a.en", "tgt": "a.de"},
        {"src": str(root / "b.en"), "tgt": str(tmp_path / "short.de"), "name": "short"},
    ]
    path = tmp_path / "r.yaml"
    data = {"root": str(root), "train": train, "valid": {"src": "val.en", "tgt": "val.de"}}
    path.write_text(yaml.safe_dump({"data": data}))
    assert main(["prepare", str(path), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the readers' progress bars
    assert err.startswith("seq2seq prepare: error:") and "short.de" in err and "b.en" in err
