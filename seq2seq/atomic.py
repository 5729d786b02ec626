"""Files that appear whole or not at all: written under a temporary name, then renamed.

A rename within one folder is atomic on POSIX file systems, so a reader (or a resume after a
kill or a full disk) sees either the previous file or the complete new one, never a part.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process: `.NAME.PID.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on any
    error (or interruption) it is removed and `path` is left as it was."""
    path = Path(path)
    staged = temporary_name(path)
    try:
        f = open(staged, mode, **open_kwargs)  # noqa: SIM115 (closed below)
    except OSError as err:  # name the file asked for, not its hidden stand-in
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        staged.replace(path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole (see `atomic_file`)."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
