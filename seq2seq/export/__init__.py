"""Export a trained model to other engines: Hugging Face Transformers (`MarianMTModel`) and
CTranslate2. Needs the optional extra: `pip install -e .[export]`.

Nothing under `seq2seq.inference` imports this package, so `translate` never loads
transformers or ctranslate2.

The output folder. A non-empty OUT is refused without `overwrite`. With it, OUT may hold only
files an export writes (the names in `WRITTEN`); anything else is named and refused, so an
export never deletes what it did not write. The new files are made in a temporary sibling
folder first and moved in only once complete.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from seq2seq.inference.checkpoint import LoadedModel, load_model

FORMATS = ("hf", "ctranslate2")
EXTRA = "pip install -e .[export]"

#: Every file name an export writes, per format.
WRITTEN: dict[str, frozenset[str]] = {
    "hf": frozenset(
        {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "source.spm",
            "target.spm",
            "vocab.json",
            "target_vocab.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
        }
    ),
    "ctranslate2": frozenset(
        {
            "model.bin",
            "config.json",
            "shared_vocabulary.json",
            "source_vocabulary.json",
            "target_vocabulary.json",
            "source.spm",
            "target.spm",
        }
    ),
}


#: The file both formats load first, and an export moves into OUT last.
MARKER = "config.json"


class ExportError(ValueError):
    """A model the target format cannot represent, or an output folder we must not touch."""


def require(module: str):
    """Import `module` from the export extra, or fail with one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"export needs {module}, which is not installed: {EXTRA}") from None


def check_out_dir(out: Path, to: str, overwrite: bool) -> None:
    """Refuse a non-empty `out` without `overwrite`, and with it one holding foreign files."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to replace an earlier export")
    foreign = [name for name in present if name not in WRITTEN[to]]
    if foreign:
        raise ExportError(
            f"{out} holds {foreign[0]}, which a --to {to} export does not write "
            f"({len(foreign)} such file(s)); refusing to overwrite a folder holding other files"
        )


def _install(staged: Path, out: Path, to: str) -> None:
    """Move the staged files into `out`, removing only earlier exports' files.

    A new `out` is the staged folder renamed: it appears complete or not at all. Into an
    existing one, config.json (which both formats load first) is removed first and moved in
    last, so an interrupted replacement leaves a folder that does not load as a model."""
    made = {p.name for p in staged.iterdir()}
    if made - WRITTEN[to]:  # a library wrote a file we do not know: keep the list honest
        raise ExportError(f"the export wrote unexpected files {sorted(made - WRITTEN[to])}")
    if not out.exists() and not out.is_symlink():
        os.rename(staged, out)
        return
    (out / MARKER).unlink(missing_ok=True)
    for old in out.iterdir():
        if old.name in WRITTEN[to] and old.name not in made:
            old.unlink()
    for name in sorted(made, key=lambda name: name == MARKER):
        os.replace(staged / name, out / name)


def export(
    model_path: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    quantization: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run directory's model (or a checkpoint) to `out` in format `to`.

    Args:
        model_path: a run directory or a checkpoint file (as `translate -m` takes).
        to: 'hf' (a MarianMTModel folder) or 'ctranslate2'.
        out: the output folder.
        quantization: ctranslate2 only: a CTranslate2 weight type such as 'int8'.
        overwrite: replace an earlier export in `out`.

    Returns:
        The output folder.
    """
    if to not in FORMATS:
        raise ExportError(f"--to {to}: choose from {', '.join(FORMATS)}")
    if quantization is not None and to != "ctranslate2":
        raise ExportError("--quantization applies to --to ctranslate2 only")
    writer = _writer(to)  # the extra is checked before anything is loaded
    out = Path(out)
    check_out_dir(out, to, overwrite)
    loaded = load_model(model_path)
    made = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            staged = Path(tmp) / "out"
            writer(loaded, staged, quantization)
            _install(staged, out, to)
    except BaseException:
        for folder in made:  # a refused export leaves no folders behind it
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return out


def _missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet, deepest first."""
    missing, parent = [], out.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def _writer(to: str) -> Callable[[LoadedModel, Path, str | None], None]:
    if to == "hf":
        require("transformers")
        require("safetensors")
        from seq2seq.export.hf import write_hf

        return lambda loaded, staged, _: write_hf(loaded, staged)
    require("ctranslate2")
    from seq2seq.export.ct2 import write_ct2

    return write_ct2
