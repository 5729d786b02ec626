"""Read parallel corpora through `datasets` and check their alignment.

Every reader yields the same `src`/`tgt` columns for the same content, whatever the format:
plain files (optionally .gz/.xz/.bz2), a TSV, WMT SGML (.sgm) test sets, a `save_to_disk`
folder, or a `datasets` hub name. All results are Arrow files (memory-mapped, cached under
`data.cache_dir`), so a 4.5M-pair corpus never sits in Python lists. Bad input raises
`DataError` with a one-line message naming the file, the line and what is wrong.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import datasets
from datasets import Dataset, Features, Value

from seq2seq.config import CorpusConfig, DataConfig

#: Bump when a reader or the tokenized layout changes: old caches are then ignored.
CACHE_VERSION = 1
TEXT = Features({"src": Value("string"), "tgt": Value("string")})


class DataError(ValueError):
    """Bad input data; the message is one line naming the file(s), the line and the problem."""


def read_corpus(
    corpus: CorpusConfig, cfg: DataConfig, cache_dir: str | os.PathLike, name: str = "train"
) -> Dataset:
    """Read one split into a Dataset with string columns `src` and `tgt` (stripped).

    Args:
        corpus: which files or dataset hold the split.
        cfg: the data section (root folder, languages, worker processes).
        cache_dir: where the Arrow cache files go.
        name: the split's name in `cfg` ('train', 'valid', 'test'), for messages.
    """
    paths = check_corpus(corpus, cfg, name)
    if corpus.dataset:
        return _read_dataset(corpus, cfg, Path(cache_dir), name)
    if corpus.tsv:
        kind, kwargs = "tsv", {"columns": tuple(corpus.tsv_columns)}
    else:
        kind = "sgm" if is_sgm(*paths) else "plain"
        kwargs = {}
    stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    fingerprint = cache_key("read", kind, stamps, kwargs, corpus.max_pairs)
    generator = {"plain": _plain_pairs, "sgm": _sgm_pairs, "tsv": _tsv_pairs}[kind]
    gen_kwargs = {"paths": tuple(map(str, paths)), "max_pairs": corpus.max_pairs, **kwargs}
    try:
        return Dataset.from_generator(
            generator,
            features=TEXT,
            gen_kwargs=gen_kwargs,
            cache_dir=str(Path(cache_dir) / "read"),
            fingerprint=fingerprint,
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise
    except ValueError as e:  # datasets: 'Instruction "train" corresponds to no data!'
        if "corresponds to no data" not in str(e):
            raise
        files = " and ".join(str(p) for p in paths)
        raise DataError(f"data.{name}: the {name} set is empty ({files} hold no pairs)") from None


def check_corpus(corpus: CorpusConfig, cfg: DataConfig, name: str) -> tuple[Path, ...]:
    """The corpus's files (none for a dataset), after checking that it names exactly one
    source of pairs, a sane `max_pairs`, and files that exist: cheap checks that `load_splits`
    runs on every training corpus before reading any."""
    given = [k for k in ("src", "tsv", "dataset") if getattr(corpus, k)]
    if len(given) != 1 or (corpus.src is None) != (corpus.tgt is None):
        raise DataError(
            f"data.{name}: give exactly one of src+tgt, tsv or dataset (got {given or 'none'})"
        )
    if corpus.max_pairs is not None and corpus.max_pairs < 1:
        raise DataError(
            f"data.{name}.max_pairs={corpus.max_pairs} leaves the {name} set empty (at least 1)"
        )
    if corpus.dataset:
        return ()
    if corpus.tsv:
        return (_existing(cfg.root, corpus.tsv, f"data.{name}.tsv"),)
    return (
        _existing(cfg.root, corpus.src, f"data.{name}.src"),
        _existing(cfg.root, corpus.tgt, f"data.{name}.tgt"),
    )


def language_mismatches(cfg: DataConfig) -> list[str]:
    """One line per corpus file whose name ends in a two-letter language code (before
    .gz/.xz/.bz2 and .sgm: `train.de.gz`, `newstest2014.en.sgm`) other than its side's
    `data.src_lang` / `data.tgt_lang` (their primary subtag: `pt` of `pt_BR`). The files decide
    what a model learns and the language keys do not change them: `--data.tgt_lang fr` alone
    would train on the recipe's German files. A hint, not an error: a file's name may say
    nothing of its language."""
    corpora = [*cfg.train_corpora(), ("data.valid", cfg.valid)]
    if cfg.test is not None:
        corpora.append(("data.test", cfg.test))
    lines = []
    for key, corpus in corpora:
        for side, path, lang in (
            ("src", corpus.src, cfg.src_lang),
            ("tgt", corpus.tgt, cfg.tgt_lang),
        ):
            if not path:
                continue
            name = _strip_compression(Path(path))
            name = name.with_suffix("") if name.suffix == ".sgm" else name
            code = name.suffix[1:]
            primary = re.split(r"[-_]", lang)[0].lower()
            if re.fullmatch(r"[a-z]{2}", code) and code != primary:
                lines.append(
                    f"{key}.{side}: {path} is named '.{code}', but data.{side}_lang is "
                    f"{lang!r}: the files decide the language; point {key}.{side} at the "
                    f"{lang!r} file, or set data.{side}_lang"
                )
    return lines


def _existing(root: str, path: str, key: str) -> Path:
    full = Path(root) / path  # an absolute `path` replaces `root`
    if not full.is_file():
        raise DataError(f"{key}: file not found: {full}")
    return full


def is_sgm(*paths: str | Path) -> bool:
    """Whether a src+tgt pair is read as WMT SGML: both files end in .sgm (before .gz/.xz/.bz2)."""
    return all(_strip_compression(Path(p)).suffix == ".sgm" for p in paths)


def _strip_compression(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".gz", ".xz", ".bz2") else path


def _open(path: str) -> IO[bytes]:
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(Path(path).suffix, open)
    return opener(path, "rb")


def _lines(path: str) -> Iterator[str]:
    """Decoded lines without their line ending; splits on b'\\n' only (never on U+2028 etc.)."""
    with _open(path) as f:
        try:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: line {n}: bytes that are not UTF-8 ({e.reason} at byte {e.start})"
                    ) from None
                line = line.rstrip("\r\n")
                yield line.removeprefix("\ufeff") if n == 1 else line
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None


def _plain_pairs(paths: tuple[str, str], max_pairs: int | None) -> Iterator[dict[str, str]]:
    src_lines, tgt_lines = _lines(paths[0]), _lines(paths[1])
    n = 0
    for src in src_lines:
        tgt = next(tgt_lines, None)
        if tgt is None:
            n_src = n + 1 + sum(1 for _ in src_lines)
            raise DataError(
                f"line counts differ: {paths[0]} has {n_src} lines, {paths[1]} has {n} lines"
            )
        if max_pairs is not None and n >= max_pairs:
            return
        n += 1
        yield {"src": src.strip(), "tgt": tgt.strip()}
    if rest := sum(1 for _ in tgt_lines):
        raise DataError(
            f"line counts differ: {paths[0]} has {n} lines, {paths[1]} has {n + rest} lines"
        )
    if n == 0:
        raise DataError(f"no lines in {paths[0]} and {paths[1]}")


def _tsv_pairs(
    paths: tuple[str], columns: tuple[int, int], max_pairs: int | None
) -> Iterator[dict[str, str]]:
    path, n_columns = paths[0], None
    for n, line in enumerate(_lines(path), start=1):
        if max_pairs is not None and n > max_pairs:
            return
        fields = line.rstrip("\r\n").split("\t")
        if n_columns is None:
            n_columns = len(fields)
            if max(columns) >= n_columns:
                raise DataError(
                    f"{path}: line 1 has {n_columns} tab-separated columns; tsv_columns={list(columns)} needs {max(columns) + 1}"
                )
        if len(fields) != n_columns:
            raise DataError(
                f"{path}: line {n}: {len(fields)} tab-separated columns, expected {n_columns} (as on line 1)"
            )
        yield {"src": fields[columns[0]].strip(), "tgt": fields[columns[1]].strip()}
    if n_columns is None:
        raise DataError(f"no lines in {path}")


_DOC = re.compile(r'<doc\s[^>]*\bdocid="([^"]*)"', re.IGNORECASE)
_SEG = re.compile(r'\s*<seg\b[^>]*?\bid="?([^">\s]*)"?[^>]*>(.*)</seg>', re.IGNORECASE)


def _segments(path: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, docid, seg id, text) per <seg>; text cleaned like sacrebleu (no unescaping)."""
    docid = ""
    for n, line in enumerate(_lines(path), start=1):
        if doc := _DOC.match(line):
            docid = doc.group(1)
        elif seg := _SEG.match(line):
            yield n, docid, seg.group(1), " ".join(seg.group(2).split())


def _sgm_pairs(paths: tuple[str, str], max_pairs: int | None) -> Iterator[dict[str, str]]:
    src_segs, ref_segs = _segments(paths[0]), _segments(paths[1])
    n = 0
    for ls, doc_s, id_s, src in src_segs:
        ref_seg = next(ref_segs, None)
        if ref_seg is None:
            n_src = n + 1 + sum(1 for _ in src_segs)
            raise DataError(
                f"segment counts differ: {paths[0]} has {n_src} <seg>s, {paths[1]} has {n} <seg>s"
            )
        lr, doc_r, id_r, ref = ref_seg
        if (doc_s, id_s) != (doc_r, id_r):
            raise DataError(
                f"segments do not align: {paths[0]} line {ls} is doc {doc_s!r} seg {id_s}, {paths[1]} line {lr} is doc {doc_r!r} seg {id_r}"
            )
        if max_pairs is not None and n >= max_pairs:
            return
        n += 1
        yield {"src": src, "tgt": ref}
    if rest := sum(1 for _ in ref_segs):
        raise DataError(
            f"segment counts differ: {paths[0]} has {n} <seg>s, {paths[1]} has {n + rest} <seg>s"
        )
    if n == 0:
        raise DataError(f"no <seg> lines in {paths[0]} and {paths[1]}")


def _read_dataset(corpus: CorpusConfig, cfg: DataConfig, cache_dir: Path, name: str) -> Dataset:
    """A local `save_to_disk` folder, or else a hub dataset, mapped onto `src`/`tgt` columns."""
    local = Path(cfg.root) / corpus.dataset
    where = f"data.{name}.dataset={corpus.dataset!r}"
    if local.is_dir():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if corpus.split not in loaded:
                raise DataError(
                    f"{where}: {local} has no split {corpus.split!r} (has {', '.join(loaded)})"
                )
            loaded = loaded[corpus.split]
    else:
        try:
            loaded = datasets.load_dataset(
                corpus.dataset, corpus.dataset_config, split=corpus.split
            )
        except Exception as e:  # offline, unknown name, ...: one line, whatever the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{where}: no folder {local} and the hub load failed: {first}"
            ) from None
    if corpus.max_pairs is not None:
        loaded = loaded.select(range(min(corpus.max_pairs, len(loaded))))
    if "translation" in loaded.column_names:
        layout = "translation"
    elif {cfg.src_lang, cfg.tgt_lang} <= set(loaded.column_names):
        layout = "columns"
    else:
        raise DataError(
            f"{where}: needs a 'translation' column or columns {cfg.src_lang!r} and {cfg.tgt_lang!r} (has {', '.join(loaded.column_names)})"
        )
    if len(loaded) == 0:
        raise DataError(f"{where}: split {corpus.split!r} is empty")
    fingerprint = cache_key("dataset", loaded._fingerprint, layout, cfg.src_lang, cfg.tgt_lang)
    return loaded.map(
        _dataset_pairs,
        batched=True,
        fn_kwargs={"layout": layout, "src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang},
        remove_columns=loaded.column_names,
        features=TEXT,
        num_proc=worker_processes(cfg.num_proc, len(loaded)),
        cache_file_name=str(cache_dir / f"read-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        desc=f"reading {name}",
    )


def _dataset_pairs(
    batch: dict[str, list], layout: str, src_lang: str, tgt_lang: str
) -> dict[str, list[str]]:
    if layout == "translation":
        src, tgt = (
            [t[src_lang] for t in batch["translation"]],
            [t[tgt_lang] for t in batch["translation"]],
        )
    else:
        src, tgt = batch[src_lang], batch[tgt_lang]
    return {"src": [(s or "").strip() for s in src], "tgt": [(t or "").strip() for t in tgt]}


# ---- caches and worker processes (shared with seq2seq.data.pipeline) ----------------------------


def cache_key(*parts: object) -> str:
    """A cache key: the same parts (and CACHE_VERSION) give the same key in every run."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


#: Fewer rows than this per worker process, and `datasets.map` runs in this process.
MIN_ROWS_PER_PROC = 10_000


def worker_processes(num_proc: int, n_rows: int) -> int | None:
    # Worker processes only pay off on big inputs; `datasets` wants None for "no workers".
    return num_proc if num_proc > 1 and n_rows >= MIN_ROWS_PER_PROC * num_proc else None
