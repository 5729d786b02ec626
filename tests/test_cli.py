"""The `seq2seq` command's process-wide settings."""

import os

from seq2seq.cli import main


def test_the_command_bounds_onednn_kernel_caches_unless_the_user_set_them(monkeypatch, capsys):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"


def test_the_command_leaves_cudnn_attention_out_of_sdpa():
    import torch

    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
