"""Tokenize and clean the parallel corpora that `seq2seq.data.readers` reads; `load_splits` runs the
whole path for a run: read every split, train (or reuse) the tokenizer, tokenize, clean.

Tokenized splits are Arrow files too (`datasets.map`, cached under `data.cache_dir`); cleaning
reports what it dropped and why. Bad input raises `DataError` (from `seq2seq.data.readers`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, concatenate_datasets

from seq2seq.config import CleanConfig, CorpusConfig, DataConfig
from seq2seq.data.readers import (
    TEXT,
    DataError,
    cache_key,
    check_corpus,
    language_mismatches,
    read_corpus,
    worker_processes,
)
from seq2seq.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_IDS = {"src_ids": List(Value("int32")), "tgt_ids": List(Value("int32"))}
_HASHES = {"src_hash": Value("int64"), "pair_hash": Value("int64"), "identical": Value("bool")}


@dataclass
class CleanReport:
    """What cleaning did to the training pairs."""

    read: int
    """Pairs read."""
    kept: int
    """Pairs kept."""
    dropped: dict[str, int]
    """Pairs dropped, by the first filter that rejected them (in filter order)."""
    corpora: list[dict[str, object]] = field(default_factory=list)
    """With several training corpora, the same counts for each (`name`, `key`, `read`,
    `kept`, `dropped`), its `weight` and the pairs it puts in one epoch (`epoch_pairs`)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class PreparedData:
    """The tokenizer and the tokenized splits of one run."""

    tokenizer: Tokenizer
    """SentencePiece model(s) trained on (a sample of) the training split."""
    train: Dataset
    """Cleaned training pairs: `src_ids` (pieces + EOS) and `tgt_ids` (pieces)."""
    valid: Dataset
    """Validation pairs, uncleaned: `src`, `tgt` (raw text) and `src_ids`, `tgt_ids`."""
    test: Dataset | None
    """Test pairs like `valid`, or None."""
    report: CleanReport
    """Counts of read, kept and dropped training pairs."""
    train_hashes: Dataset
    """Per kept training pair: `src_hash`, `pair_hash` (64-bit), for overlap checks."""
    train_rows: np.ndarray | None = None
    """The rows of `train` one epoch holds, repeated or thinned by their corpus's weight
    (`epoch_rows`); None: every row once."""


# ---- tokenizing and cleaning -----------------------------------------------------------------


def tokenize(
    raw: Dataset,
    tokenizer: Tokenizer,
    keep_text: bool,
    cache_dir: str | os.PathLike,
    num_proc: int = 1,
) -> Dataset:
    """Add `src_ids` (pieces + EOS) and `tgt_ids` (pieces) with `datasets.map` (cached).

    With `keep_text` the raw `src`/`tgt` stay (valid/test, for BLEU); without, they are replaced
    by `src_hash`, `pair_hash` and `identical` (train, for cleaning and overlap checks).
    """
    fingerprint = cache_key("tokenize", raw._fingerprint, tokenizer_digest(tokenizer), keep_text)
    features = Features({**(TEXT if keep_text else {}), **_IDS, **({} if keep_text else _HASHES)})
    return raw.map(
        _encode_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "keep_text": keep_text},
        remove_columns=None if keep_text else ["src", "tgt"],
        features=features,
        num_proc=worker_processes(num_proc, len(raw)),
        cache_file_name=str(Path(cache_dir) / f"tok-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def _encode_batch(
    batch: dict[str, list[str]], tokenizer: Tokenizer, keep_text: bool
) -> dict[str, list]:
    out: dict[str, list] = {
        "src_ids": tokenizer.encode_src(batch["src"]),
        "tgt_ids": tokenizer.encode_tgt(batch["tgt"]),
    }
    if not keep_text:
        out["src_hash"] = [text_hash(s) for s in batch["src"]]
        out["pair_hash"] = [
            text_hash(s + "\t" + t) for s, t in zip(batch["src"], batch["tgt"], strict=True)
        ]
        out["identical"] = [s == t for s, t in zip(batch["src"], batch["tgt"], strict=True)]
    return out


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a string (the same in every process and run)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    state = tokenizer.to_state()
    return hashlib.sha256((state["src_model"] or b"") + (state["tgt_model"] or b"")).hexdigest()[
        :16
    ]


def id_lengths(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """len(src_ids) and len(tgt_ids) of every row, read from Arrow offsets (no Python lists)."""
    assert ds._indices is None, "id_lengths needs a dataset without an indices mapping"
    return tuple(
        pc.list_value_length(ds.data.column(c)).to_numpy().astype(np.int64)
        for c in ("src_ids", "tgt_ids")
    )


def clean(
    train: Dataset, cfg: CleanConfig, corpora: list[tuple[str, str, int]] | None = None
) -> tuple[np.ndarray, CleanReport]:
    """Which training rows survive the filters, and the report; each drop counts under its first filter.

    Filters in order: empty side, source == target, either side longer than `max_length`
    pieces, piece-length ratio above `max_ratio`, duplicate of an earlier kept pair (in any
    corpus). `corpora` lists the corpora `train` concatenates, as (name, key, rows), for
    counts per corpus.
    """
    src_ids_len, tgt_len = id_lengths(train)
    src_len = src_ids_len - 1  # pieces, without the EOS
    reason = np.zeros(len(train), dtype=np.int8)
    filters = _filter_names(cfg)
    shorter = np.maximum(np.minimum(src_len, tgt_len), 1)
    longer = np.maximum(src_len, tgt_len)
    masks = {
        "empty": (src_len == 0) | (tgt_len == 0),
        "identical": lambda: train.data.column("identical").to_numpy(zero_copy_only=False),
        "too_long": longer > cfg.max_length,
        "ratio": longer / shorter > cfg.max_ratio,
    }
    for code, key in enumerate(filters, start=1):
        if key == "duplicate":
            alive = np.flatnonzero(reason == 0)
            hashes = train.data.column("pair_hash").to_numpy()[alive]
            duplicate = np.ones(len(alive), dtype=bool)
            duplicate[np.unique(hashes, return_index=True)[1]] = False  # first occurrences stay
            reason[alive[duplicate]] = code
        else:
            mask = masks[key]() if callable(masks[key]) else masks[key]
            reason[(reason == 0) & mask] = code
    report = _counts(reason, filters)
    if corpora and len(corpora) > 1:
        start = 0
        for name, key, n in corpora:
            part = _counts(reason[start : start + n], filters)
            report.corpora.append(
                {"name": name, "key": key, "read": part.read, "kept": part.kept}
                | {"dropped": part.dropped}
            )
            start += n
    return np.flatnonzero(reason == 0), report


def _counts(reason: np.ndarray, filters: dict[str, str]) -> CleanReport:
    counts = np.bincount(reason, minlength=len(filters) + 1)
    dropped = {key: int(c) for key, c in zip(filters, counts[1:], strict=True)}
    return CleanReport(read=len(reason), kept=int(counts[0]), dropped=dropped)


def epoch_rows(corpus_of: np.ndarray, weights: list[float], seed: int) -> np.ndarray | None:
    """The rows one training epoch holds when corpus `c` (`corpus_of[row]`) has weight
    `weights[c]`: every row int(w) times, plus a fixed, seeded share (w - int(w)) of the
    corpus's rows once more, in row order. None when every weight is 1 (each row once)."""
    if all(w == 1 for w in weights):
        return None
    rng = np.random.default_rng([seed, 20170612])
    parts = []
    for c, w in enumerate(weights):
        rows = np.flatnonzero(corpus_of == c)
        parts += [rows] * int(w)
        if extra := _extra_pairs(w, len(rows)):
            parts.append(np.sort(rng.choice(rows, size=extra, replace=False)))
    return np.sort(np.concatenate(parts), kind="stable")


def _extra_pairs(weight: float, n: int) -> int:
    """How many of a corpus's `n` pairs its weight's fraction adds to an epoch once more."""
    return round((weight - int(weight)) * n)


#: The most pairs one corpus may give an epoch (int32 row numbers; 2**31 rows of an epoch
#: take 16 GiB as int64 indices): a weight such as 1e12, a slip of the finger, is refused
#: instead of exhausting memory.
MAX_EPOCH_PAIRS = 2**31 - 1


def check_weights(corpora: list[tuple[str, CorpusConfig]], counts: list[int], what: str) -> None:
    """Refuse a weight so small that its corpus, of `counts[c]` pairs (`what`: read or kept),
    gives no pair to an epoch, or so large that it gives more than `MAX_EPOCH_PAIRS`: only
    the corpus's size tells, so the recipe cannot. Checked on the pairs read, before a
    tokenizer is trained, and again on those cleaning kept."""
    for (key, corpus), n in zip(corpora, counts, strict=True):
        w = corpus.weight
        if n and int(w) == 0 and _extra_pairs(w, n) == 0:
            raise DataError(
                f"{key}.weight={w} gives 0 of its {n} {what} pairs to an epoch; "
                f"a weight of 1/{n} = {1 / n:.3g} gives one"
            )
        if w * n > MAX_EPOCH_PAIRS:
            raise DataError(
                f"{key}.weight={w} x {n} {what} pairs = {w * n:.3g} pairs per epoch, more "
                f"than {MAX_EPOCH_PAIRS:,}; lower it"
            )


def _filter_names(cfg: CleanConfig) -> dict[str, str]:
    """Enabled filters, in order: key -> label naming the setting."""
    names = {"empty": "empty"}
    if cfg.drop_identical:
        names["identical"] = "identical (source == target)"
    if cfg.max_length:
        names["too_long"] = f"too_long (> {cfg.max_length} pieces)"
    if cfg.max_ratio:
        names["ratio"] = f"ratio (> {cfg.max_ratio})"
    if cfg.dedup:
        names["duplicate"] = "duplicate"
    return names


# ---- the whole path --------------------------------------------------------------------------


def _tokenizer_inputs(cfg: DataConfig) -> dict:
    """The recipe keys SentencePiece's training text and settings come from (`spm.json`):
    not a corpus's weight or name (it samples the pairs read, unweighted)."""
    train = [
        {k: v for k, v in asdict(corpus).items() if k not in ("weight", "name")}
        for _, corpus in cfg.train_corpora()
    ]
    return {
        "root": os.path.normpath(cfg.root),
        "src_lang": cfg.src_lang,
        "tgt_lang": cfg.tgt_lang,
        "train": train[0] if len(train) == 1 else train,
        "tokenizer": asdict(cfg.tokenizer),
        "seed": cfg.seed,
    }


def load_splits(cfg: DataConfig, run_dir: str | os.PathLike) -> PreparedData:
    """Read, check, tokenize and clean every split; train (or reuse) the tokenizer.

    `load_splits(cfg: DataConfig, run_dir: str | PathLike) -> PreparedData`. The tokenizer is
    trained on a sample of the stripped training pairs and saved in `run_dir` (reused when
    present); Arrow caches go to `cfg.cache_dir` (default `<run_dir>/cache`), so a second call
    with the same inputs only memory-maps files. Download (`seq2seq.data.download`) happens before.

    Raises:
        DataError: a missing, unreadable or misaligned file, no training pair left, or a
            corpus weight too small to give its corpus a pair in an epoch.
    """
    run_dir = Path(run_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    for line in language_mismatches(cfg):
        log.warning(line)
    corpora = cfg.train_corpora()
    for key, corpus in corpora:  # a missing file fails before hours of reading the others
        check_corpus(corpus, cfg, key.removeprefix("data."))
    parts = [read_corpus(c, cfg, cache, key.removeprefix("data.")) for key, c in corpora]
    raw_train = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    sizes = [(c.label(), key, len(part)) for (key, c), part in zip(corpora, parts, strict=True)]
    check_weights(corpora, [n for *_, n in sizes], "read")
    raw_valid = read_corpus(cfg.valid, cfg, cache, "valid")
    raw_test = read_corpus(cfg.test, cfg, cache, "test") if cfg.test else None

    joint = cfg.tokenizer.joint
    sample = _sample_rows(
        raw_train, cfg.tokenizer.input_sentence_size // (2 if joint else 1), cfg.seed
    )
    tokenizer = Tokenizer.train(
        _column_lines(sample, "src"),
        _column_lines(sample, "tgt"),
        cfg.tokenizer,
        run_dir,
        seed=cfg.seed,
        trained_on=_tokenizer_inputs(cfg),
    )

    tokenized = tokenize(
        raw_train, tokenizer, keep_text=False, cache_dir=cache, num_proc=cfg.num_proc
    )
    keep, report = clean(tokenized, cfg.clean, sizes)
    if report.kept == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items() if v)
        raise DataError(
            f"data.train: cleaning dropped all {report.read} pairs ({reasons}); see data.clean"
        )
    if report.kept < report.read:
        fingerprint = cache_key("clean", tokenized._fingerprint, asdict(cfg.clean))
        tokenized = tokenized.select(keep, keep_in_memory=True).flatten_indices(
            cache_file_name=str(cache / f"clean-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            num_proc=worker_processes(cfg.num_proc, report.kept),
        )
    valid = tokenize(raw_valid, tokenizer, keep_text=True, cache_dir=cache, num_proc=cfg.num_proc)
    test = (
        tokenize(raw_test, tokenizer, keep_text=True, cache_dir=cache, num_proc=cfg.num_proc)
        if raw_test
        else None
    )
    log.info("train: %d pairs read, %d kept, dropped %s", report.read, report.kept, report.dropped)
    weights = [c.weight for _, c in corpora]
    corpus_of = np.repeat(np.arange(len(sizes)), [n for *_, n in sizes])[keep]
    check_weights(corpora, np.bincount(corpus_of, minlength=len(corpora)).tolist(), "kept")
    rows = epoch_rows(corpus_of, weights, cfg.seed)
    for c, part in enumerate(report.corpora):
        part["weight"] = weights[c]
        in_epoch = corpus_of if rows is None else corpus_of[rows]
        part["epoch_pairs"] = int(np.sum(in_epoch == c))
    return PreparedData(
        tokenizer=tokenizer,
        train=tokenized.select_columns(["src_ids", "tgt_ids"]),
        valid=valid,
        test=test,
        report=report,
        train_hashes=tokenized.select_columns(["src_hash", "pair_hash"]),
        train_rows=rows,
    )


def _sample_rows(ds: Dataset, n: int, seed: int) -> Dataset:
    """At most `n` rows, drawn without replacement from `seed` (in corpus order)."""
    if n >= len(ds):
        return ds
    rows = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(rows, keep_in_memory=True)


def _column_lines(ds: Dataset, column: str) -> Iterator[str]:
    """Non-empty lines of one text column, streamed in Arrow batches."""
    for batch in ds.select_columns([column]).iter(batch_size=10_000):
        yield from (line for line in batch[column] if line)
