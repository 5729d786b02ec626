"""The `seq2seq` command's process-wide settings."""

import os

from seq2seq.cli import main


def test_the_command_bounds_onednn_kernel_cache_unless_the_user_set_it(monkeypatch, capsys):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"
