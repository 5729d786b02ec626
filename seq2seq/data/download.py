"""Fetch a known corpus (Multi30k task 1, raw) into `data.root` when its files are missing.

Each file is downloaded with urllib to a temporary name, its size and sha256 are checked
against the values recorded below, and only then is it renamed into place. Offline, point
`data.root` at a local copy instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from seq2seq.config import DataConfig
from seq2seq.data.readers import DataError

log = logging.getLogger(__name__)

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("en", "de", "fr", "cs")

#: name -> (bytes, sha256) of the raw Multi30k files (as in ../shared/data/multi30k).
MULTI30K_FILES: dict[str, tuple[int, str]] = {
    "train.en.gz": (568929, "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
    "train.de.gz": (637044, "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
    "train.fr.gz": (604242, "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c"),
    "train.cs.gz": (593827, "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077"),
    "val.en.gz": (21650, "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
    "val.de.gz": (24681, "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
    "val.fr.gz": (23001, "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9"),
    "val.cs.gz": (22096, "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc"),
    "test_2016_flickr.en.gz": (
        21077,
        "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    ),
    "test_2016_flickr.de.gz": (
        22890,
        "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    ),
    "test_2016_flickr.fr.gz": (
        22310,
        "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    ),
    "test_2016_flickr.cs.gz": (
        22572,
        "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    ),
}


class DownloadError(DataError):
    """A file could not be fetched or did not match its recorded size/sha256 (one-line message)."""


def ensure_downloaded(cfg: DataConfig) -> list[Path]:
    """Fetch the files of `cfg.download` that are missing from `cfg.root`; returns those fetched."""
    if cfg.download is None:
        return []
    if cfg.download != "multi30k":
        raise ValueError(
            f"data.download={cfg.download!r} is not a known corpus; use 'multi30k' or none"
        )
    return download_multi30k(
        cfg.root, (cfg.src_lang, cfg.tgt_lang), cfg.download_url or MULTI30K_URL
    )


def download_multi30k(
    root: str | os.PathLike,
    langs: tuple[str, ...] = ("en", "de"),
    base_url: str = MULTI30K_URL,
    timeout: float = 60.0,
) -> list[Path]:
    """Download the train/val/test_2016_flickr files of `langs` missing from `root`.

    Returns:
        The paths written (empty when everything was there already).

    Raises:
        DownloadError: the server is unreachable, answers an error, or a file's checksum differs.
    """
    unknown = sorted(set(langs) - set(MULTI30K_LANGS))
    if unknown:
        raise ValueError(
            f"Multi30k has no language(s) {unknown}; it has {', '.join(MULTI30K_LANGS)}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in (f"{split}.{lang}.gz" for split in MULTI30K_SPLITS for lang in langs):
        if not (root / name).exists():
            fetch(
                base_url.rstrip("/") + "/" + name,
                root / name,
                *MULTI30K_FILES[name],
                timeout=timeout,
            )
            fetched.append(root / name)
    return fetched


def fetch(url: str, dest: Path, size: int, sha256: str, timeout: float = 60.0) -> None:
    """Download `url` to `dest` atomically (temporary file + rename) after checking size and sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                n += len(chunk)
        if (n, digest.hexdigest()) != (size, sha256):
            raise DownloadError(
                f"checksum mismatch for {url}: got {n} bytes sha256 {digest.hexdigest()}, expected {size} bytes sha256 {sha256}"
            )
        os.replace(tmp, dest)
        log.info("downloaded %s (%d bytes)", dest, n)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"cannot download {url}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
