"""The `seq2seq` command's process-wide settings and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest

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


def test_the_console_script_imports_torch_uncollected_then_freezes_it():
    """In its own process the command imports torch with the garbage collector off (it ran
    some 380 collections over torch's objects, 0.2 s) and freezes what the import made; the
    collector is on again for the command's own work."""
    probe = (
        "import atexit, gc, json, sys\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'stop' and runs.append(1))\n"
        "from seq2seq.cli import import_torch_untracked, run\n"
        "runs.clear()\n"
        "import_torch_untracked()\n"
        "during = len(runs)\n"
        "gc.unfreeze()\n"
        "atexit.register(lambda: print(json.dumps([during, 'torch' in sys.modules,\n"
        "    gc.get_freeze_count(), gc.isenabled()]), file=sys.stderr))\n"
        "sys.argv = ['seq2seq', 'info', '--preset', 'tiny', '--vocab-size', '100', '--json']\n"
        "run()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    during, imported, frozen, enabled = json.loads(done.stderr.strip().splitlines()[-1])
    assert during == 0 and imported and enabled
    assert frozen > 50_000  # run() froze torch's objects again (the probe unfroze them)


def test_a_caller_of_main_keeps_its_garbage_collector_as_it_was():
    import gc

    frozen = gc.get_freeze_count()
    assert main(["info", "--preset", "tiny", "--vocab-size", "100", "--json"]) == 0
    assert gc.get_freeze_count() == frozen and gc.isenabled()


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


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys):
    """Python's "[Errno 2] No such file or directory: 'x'" becomes "x: no such file or
    directory", whichever command meets it."""
    ref = tmp_path / "ref.de"
    ref.write_text("Ein Hund.\n")
    missing = tmp_path / "hyp.de"
    assert main(["evaluate", "--hyp", str(missing), "--ref", str(ref)]) == 1
    assert capsys.readouterr().err == (
        f"seq2seq evaluate: error: {missing}: no such file or directory\n"
    )


def test_translate_names_a_missing_input_before_loading_any_model(tmp_path, capsys, monkeypatch):
    from seq2seq.inference.translator import Translator

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded for an input that does not exist")

    monkeypatch.setattr(Translator, "load", load)
    missing = tmp_path / "in.en"
    assert main(["translate", "-m", str(tmp_path / "run"), "-i", str(missing)]) == 1
    assert capsys.readouterr().err.endswith(f"error: {missing}: no such file or directory\n")


def test_other_errors_keep_their_words_on_one_line():
    from seq2seq.cli import error_line

    assert error_line(ValueError("decode.beam=0\n  must be at least 1")) == (
        "decode.beam=0 must be at least 1"
    )
    assert error_line(OSError("disk full")) == "disk full"  # no file named: as raised
    assert error_line(PermissionError(13, "Permission denied", "out.de")) == (
        "out.de: permission denied"
    )
    assert error_line(RuntimeError()) == "RuntimeError"


def test_a_reader_that_goes_away_ends_the_command_quietly_as_unix_tools_do():
    """`seq2seq ... | head`: no traceback, no error line; the exit code is 128 + SIGPIPE."""
    command = [sys.executable, "-m", "seq2seq", "info", "--preset", "tiny", "--vocab-size", "100"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command writes a byte
    stderr = process.stderr.read()
    assert process.wait() == 141 and stderr == b""


def test_a_broken_pipe_to_anything_but_stdout_is_an_error(monkeypatch, capsys):
    """A child process that died (CTranslate2's server in bench) is a failure to report."""
    import seq2seq.cli as cli

    def broken(args, overrides):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    assert main(["info", "--preset", "tiny"]) == 1
    assert capsys.readouterr().err == "seq2seq info: error: [Errno 32] Broken pipe\n"


def test_lightnings_refusal_of_a_trainer_setting_is_one_line_and_other_bugs_still_raise(
    monkeypatch, capsys
):
    import seq2seq.cli as cli

    class MisconfigurationException(Exception):  # Lightning's, by name
        pass

    def refused(args, overrides):
        raise MisconfigurationException("`Trainer(devices=0)` value is not a valid input")

    monkeypatch.setattr(cli, "_cmd_info", refused)
    assert main(["info", "--preset", "tiny"]) == 1
    assert capsys.readouterr().err == (
        "seq2seq info: error: `Trainer(devices=0)` value is not a valid input\n"
    )

    def bug(args, overrides):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    with pytest.raises(KeyError):
        main(["info", "--preset", "tiny"])


def test_ctrl_c_before_a_command_says_so_rather_than_printing_nothing(monkeypatch, capsys):
    import seq2seq.data.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "prepare", interrupted)
    assert main(["prepare", "recipes/multi30k_en_de.yaml", "--run-dir", "unused"]) == 130
    assert capsys.readouterr().err.strip() == "seq2seq prepare: interrupted"
