"""Multi30k download against a real local HTTP server: fetch, checksum, clean failures."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seq2seq.config import DataConfig
from seq2seq.data.download import (
    MULTI30K_FILES,
    DownloadError,
    download_multi30k,
    ensure_downloaded,
)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(multi30k_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves): a temp copy of the en/de Multi30k files on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in MULTI30K_FILES:
        if name.split(".")[1] in ("en", "de"):
            shutil.copy(multi30k_dir / name, folder / name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_recorded_sizes_and_checksums_match_the_shared_copy(multi30k_dir: Path) -> None:
    for name, (size, sha256) in MULTI30K_FILES.items():
        data = (multi30k_dir / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256), name


def test_missing_files_are_downloaded_and_present_ones_kept(
    served, tmp_path: Path, multi30k_dir: Path
) -> None:
    url, _ = served
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(multi30k_dir / "train.en.gz", root / "train.en.gz")
    cfg = DataConfig(root=str(root), download="multi30k", download_url=url)
    fetched = ensure_downloaded(cfg)
    expected = {
        f"{s}.{lang}.gz" for s in ("train", "val", "test_2016_flickr") for lang in ("en", "de")
    }
    assert {p.name for p in fetched} == expected - {"train.en.gz"}
    for p in root.iterdir():
        assert p.read_bytes() == (multi30k_dir / p.name).read_bytes()
    assert ensure_downloaded(cfg) == []  # everything is there now


def test_server_down_fails_in_one_clear_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/"
    with pytest.raises(
        DownloadError, match=r"cannot download http://127\.0\.0\.1:\d+/train\.en\.gz: .*refused"
    ) as info:
        download_multi30k(tmp_path, ("en", "de"), url, timeout=5)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_wrong_checksum_fails_and_leaves_no_file(served, tmp_path: Path) -> None:
    url, folder = served
    (folder / "train.en.gz").write_bytes(b"not the real file")
    with pytest.raises(
        DownloadError, match=r"checksum mismatch for .*train\.en\.gz: got 17 bytes"
    ) as info:
        download_multi30k(tmp_path / "root", ("en",), url)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "root").iterdir()) == []


def test_http_error_names_the_url_and_status(served, tmp_path: Path) -> None:
    url, folder = served
    (folder / "val.de.gz").unlink()
    with pytest.raises(DownloadError, match=r"cannot download .*/val\.de\.gz: HTTP 404"):
        download_multi30k(tmp_path / "root", ("en", "de"), url)
    assert not (tmp_path / "root" / "val.de.gz").exists()


def test_unknown_corpus_or_language_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a known corpus"):
        ensure_downloaded(DataConfig(root=str(tmp_path), download="wmt14"))
    with pytest.raises(ValueError, match="no language"):
        download_multi30k(tmp_path, ("en", "ja"))
