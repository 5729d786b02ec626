"""`seq2seq prepare`: run the whole data path once and report what it did."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from datasets import Dataset

from seq2seq.config import DataConfig
from seq2seq.data.download import ensure_downloaded
from seq2seq.data.pipeline import PreparedData, id_lengths, load_splits, text_hash
from seq2seq.rundir import RunDir

_PERCENTILES = (50, 90, 99)
_EXAMPLES = 3


def prepare(data: DataConfig, run_dir: str | os.PathLike) -> dict[str, object]:
    """Download (if configured), read, check, clean and tokenize every split; train the tokenizer.

    Returns:
        A JSON-ready report: pairs read/kept/dropped by reason, vocabulary size(s), per split
        the pair and piece counts and length percentiles (pieces, without BOS/EOS), and
        `warnings` (e.g. valid/test sentences that also occur in the training data).
    """
    downloaded = ensure_downloaded(data)
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    with run.hold():  # not beside a `train` of this run, nor another `prepare`
        run.remove_stale_staged()
        prepared = load_splits(data, run_dir)
    tok = prepared.tokenizer
    splits = {"train": prepared.train, "valid": prepared.valid}
    if prepared.test is not None:
        splits["test"] = prepared.test
    return {
        "run_dir": str(Path(run_dir)),
        "downloaded": [str(p) for p in downloaded],
        "train": {**prepared.report.to_dict(), "clean": asdict(data.clean)},
        "vocab": {"joint": tok.joint, "src": tok.src_vocab_size, "tgt": tok.tgt_vocab_size},
        "splits": {name: _split_stats(ds) for name, ds in splits.items()},
        "warnings": _overlap_warnings(prepared),
    }


def _split_stats(ds: Dataset) -> dict[str, object]:
    src_ids_len, tgt_len = id_lengths(ds)
    sides = {"src": src_ids_len - 1, "tgt": tgt_len}  # pieces: src_ids end with EOS
    stats: dict[str, object] = {"pairs": len(ds)}
    for side, lengths in sides.items():
        stats[f"{side}_pieces"] = int(lengths.sum())
        stats[f"{side}_length"] = _percentiles(lengths)
    return stats


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {}
    values = np.percentile(lengths, _PERCENTILES, method="nearest")
    return {
        **{f"p{p}": int(v) for p, v in zip(_PERCENTILES, values, strict=True)},
        "max": int(lengths.max()),
    }


def _overlap_warnings(prepared: PreparedData) -> list[str]:
    """One warning per held-out split whose sources (or whole pairs) occur in the kept training data."""
    train_src = prepared.train_hashes.data.column("src_hash").to_numpy()
    train_pair = prepared.train_hashes.data.column("pair_hash").to_numpy()
    warnings = []
    for name, ds in (("valid", prepared.valid), ("test", prepared.test)):
        if ds is None:
            continue
        src, tgt = list(ds["src"]), list(ds["tgt"])
        in_train = np.isin([text_hash(s) for s in src], train_src)
        pairs_in_train = np.isin(
            [text_hash(s + "\t" + t) for s, t in zip(src, tgt, strict=True)], train_pair
        )
        if n := int(in_train.sum()):
            examples = "; ".join(repr(src[i]) for i in np.flatnonzero(in_train)[:_EXAMPLES])
            warnings.append(
                f"{name}: {n} of {len(src)} source sentences also occur in the training data "
                f"({int(pairs_in_train.sum())} as whole pairs), e.g. {examples}"
            )
    return warnings


def format_report(report: dict[str, object]) -> str:
    """The report of `prepare` as lines for humans."""
    train, vocab = report["train"], report["vocab"]
    dropped = ", ".join(f"{k} {v}" for k, v in train["dropped"].items())
    lines = [
        f"run dir      {report['run_dir']}",
        f"train pairs  {train['read']} read, {train['kept']} kept; dropped: {dropped or 'none'}",
        "vocabulary   "
        + (
            f"joint {vocab['src']}" if vocab["joint"] else f"src {vocab['src']}, tgt {vocab['tgt']}"
        ),
    ]
    for corpus in train.get("corpora", []):
        gone = ", ".join(f"{k} {v}" for k, v in corpus["dropped"].items() if v)
        lines.insert(
            len(lines) - 1,
            f"  {corpus['name']} ({corpus['key']})  {corpus['read']} read, {corpus['kept']} kept, "
            f"weight {corpus['weight']:g}: {corpus['epoch_pairs']} per epoch; "
            f"dropped: {gone or 'none'}",
        )
    if report["downloaded"]:
        lines.insert(1, f"downloaded   {len(report['downloaded'])} files")
    lines.append(
        f"{'split':<8}{'pairs':>9}{'src pieces':>12}{'tgt pieces':>12}  length p50/p90/p99/max (src | tgt)"
    )
    for name, s in report["splits"].items():
        lengths = " | ".join(
            "/".join(str(v) for v in s[f"{side}_length"].values()) for side in ("src", "tgt")
        )
        lines.append(
            f"{name:<8}{s['pairs']:>9}{s['src_pieces']:>12}{s['tgt_pieces']:>12}  {lengths}"
        )
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
