"""The `seq2seq` command's process-wide settings."""

import json
import os
import subprocess
import sys

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


def test_the_console_script_flushes_a_quick_exit_commands_output_to_a_pipe(tmp_path):
    """`seq2seq evaluate` ends with os._exit (QUICK_EXIT): what it printed to a pipe, which
    Python buffers, still arrives whole, and the exit code is the command's."""
    hyp, ref = tmp_path / "hyp.de", tmp_path / "ref.de"
    hyp.write_text("Ein Hund rennt.\nEin Mann.\n", encoding="utf-8")
    ref.write_text("Ein Hund rennt.\nEin Mann .\n", encoding="utf-8")
    command = [sys.executable, "-m", "seq2seq", "evaluate", "--hyp", str(hyp), "--ref", str(ref)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # CI sets it
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bleu"] > 0
    missing = subprocess.run([*command[:-1], str(tmp_path / "none.de")], capture_output=True)
    assert missing.returncode == 1 and b"none.de" in missing.stderr
