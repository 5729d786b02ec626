"""Files that appear whole or not at all: written under a temporary name, then renamed.

A rename within one folder is atomic on POSIX file systems, so a reader (or a resume after a
kill or a full disk) sees either the previous file or the complete new one, never a part.
Only regular files are replaced so: a symbolic link stays a link, its target takes the new
content; a path that is no regular file (a device such as /dev/null or /dev/stdout, a named
pipe, a shell's `>(...)`) is written in place, as a shell's `>` would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

#: The longest file name most file systems take, in bytes.
_NAME_MAX = 255


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process: `.NAME.PID.tmp`, NAME shortened
    where the whole would pass the file system's longest name."""
    suffix = f".{os.getpid()}.tmp"
    name = path.name
    while name and len(os.fsencode(f".{name}{suffix}")) > _NAME_MAX:
        name = name[:-1]
    return path.with_name(f".{name}{suffix}")


def _staged_target(path: Path) -> Path | None:
    """The regular file a rename would replace for `path` (its link's target, for a symbolic
    link), or None where `path` exists as something else, or names a device or an open file
    (/dev, /proc: /dev/stdout redirected to a file stats as that file, which a rename would
    replace under the shell's feet), to be written in place. A folder is refused, naming
    `path`."""
    if path.parts[1:2] in (("dev",), ("proc",)) and path.is_absolute():
        return None  # /dev/stdout, /dev/fd/N, /proc/self/fd/N: the file open there, in place
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        mode = None  # a new file (or a dangling link's target)
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(path))
    if mode is not None and not stat.S_ISREG(mode):
        return None
    return path.resolve() if path.is_symlink() else path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on any
    error (or interruption) it is removed and `path` is left as it was. A path that is no
    regular file (a device, a pipe) is opened itself; a folder is refused at once."""
    path = Path(path)
    target = _staged_target(path)
    if target is None:
        with open(path, mode, **open_kwargs) as f:
            yield f
        return
    staged = temporary_name(target)
    try:
        f = open(staged, mode, **open_kwargs)  # noqa: SIM115 (closed below)
    except OSError as err:  # name the file asked for, not its hidden stand-in
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        staged.replace(target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole (see `atomic_file`)."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
