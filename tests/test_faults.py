"""Trust and faults: a checkpoint never runs code, no command destroys a user's file, and
impossible settings are one clear line."""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from seq2seq.cli import main
from seq2seq.inference.checkpoint import read_checkpoint

RECIPE = str(Path(__file__).parents[1] / "recipes" / "multi30k_en_de.yaml")


class Payload:
    """Unpickling this object would create the file `marker`: code run by loading."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poisoned_copy(checkpoint: Path, out: Path) -> tuple[Path, Path]:
    """`checkpoint` with a pickle payload added; the file its payload would create."""
    marker = out.parent / f"{out.stem}.pwned"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["payload"] = Payload(marker)
    torch.save(ckpt, out)
    return out, marker


def one_line_error(capsys) -> str:
    """The one line of the error; a command's "INFO: " lines before it (translate's settings
    line, once its model has loaded) say what it was doing, not what went wrong."""
    lines = capsys.readouterr().err.strip().splitlines()
    said = [line for line in lines if not line.startswith("INFO: ")]
    assert len(said) == 1 and said == lines[-1:], lines
    return said[0]


@pytest.mark.parametrize("command", ["translate", "evaluate", "average", "init-from"])
def test_a_checkpoint_with_a_pickle_payload_is_refused_by_every_command_and_runs_nothing(
    checkpoint, tmp_path, capsys, command
):
    bad, marker = poisoned_copy(checkpoint, tmp_path / "shared.ckpt")
    src = tmp_path / "in.en"
    src.write_text("A dog runs.\n")
    out = tmp_path / "out"
    argv = {
        "translate": ["translate", "-m", str(bad), "-i", str(src), "-o", str(out)],
        "evaluate": ["evaluate", "-m", str(bad), "--src", str(src), "--ref", str(src)],
        "average": ["average", str(bad), str(checkpoint), "-o", str(out)],
        "init-from": ["train", RECIPE, "--init-from", str(bad), "--run-dir", str(out)],
    }[command]
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert str(bad) in err and "refused" in err
    assert not marker.exists() and not out.exists()


def test_our_own_checkpoints_need_nothing_beyond_the_weights_only_loader(checkpoint):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []
    assert "state_dict" in read_checkpoint(checkpoint)


def test_a_checkpoint_in_torchs_legacy_format_loads_too_and_a_payload_in_it_runs_nothing(
    checkpoint, tmp_path, capsys
):
    ckpt = torch.load(checkpoint, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)  # no mmap for this format
    loaded = read_checkpoint(legacy)
    assert torch.equal(
        loaded["state_dict"]["model.generator.weight"], ckpt["state_dict"]["model.generator.weight"]
    )
    marker = tmp_path / "legacy.pwned"
    ckpt["payload"] = Payload(marker)
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    src = tmp_path / "in.en"
    src.write_text("A dog runs.\n")
    assert main(["translate", "-m", str(legacy), "-i", str(src), "-o", str(tmp_path / "out")]) == 1
    err = one_line_error(capsys)
    assert str(legacy) in err and "refused" in err and "io.open" in err
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_bare_pickle_with_a_payload_is_refused_naming_what_it_would_call(
    tmp_path, capsys, protocol
):
    """A `pickle.dump` file is no torch format: the weights-only loader fails on it without
    naming the payload (protocol 4: 'Unsupported operand 149'); the file's opcodes, read
    without running them, name it, and torch's warning about the protocol stays out."""
    marker = tmp_path / "bare.pwned"
    bare = tmp_path / "model.pkl"
    with bare.open("wb") as f:
        pickle.dump({"weights": torch.zeros(2), "x": Payload(marker)}, f, protocol=protocol)
    src = tmp_path / "in.en"
    src.write_text("A dog runs.\n")
    assert main(["translate", "-m", str(bare), "-i", str(src), "-o", str(tmp_path / "out")]) == 1
    err = one_line_error(capsys)
    assert str(bare) in err and "refused" in err and "io.open" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        ("zip", "truncated: torch's zip format without its end"),
        ("legacy", "truncated: the file ends early"),
        ("text", "not a torch checkpoint: neither torch's zip format nor a pickle"),
        ("empty", "an empty file"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_says_what_is_wrong_with_it(checkpoint, tmp_path, cut, why):
    """A copy cut short (either of torch's formats), a text file and an empty file each get
    the reason in words, not torch's internals ("PytorchStreamReader failed reading zip
    archive", "pop from empty list", "EOFError")."""
    from seq2seq.inference.checkpoint import CheckpointError

    bad = tmp_path / "bad.ckpt"
    if cut == "zip":
        bad.write_bytes(checkpoint.read_bytes()[:4096])
    elif cut == "legacy":
        torch.save({"a": torch.ones(300)}, bad, _use_new_zipfile_serialization=False)
        bad.write_bytes(bad.read_bytes()[:50])  # inside its header pickle
    else:
        bad.write_text("" if cut == "empty" else "A dog runs.\n")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert str(err.value) == f"{bad}: not a readable checkpoint ({why})"


def test_output_over_the_input_or_a_hard_link_to_it_is_refused_before_anything_is_written(
    checkpoint, tmp_path, capsys
):
    src = tmp_path / "in.txt"
    src.write_text("A dog runs.\nTwo cats.\n")
    os.link(src, tmp_path / "link.txt")
    for out in (src, tmp_path / "link.txt"):
        assert main(["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(out)]) == 1
        assert "is the input file" in one_line_error(capsys)
        assert src.read_text() == "A dog runs.\nTwo cats.\n"


def test_output_over_the_file_behind_a_redirected_stdin_or_stdout_is_refused(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """`translate -o f < f` would replace the input with its translation, and `translate -i f
    >> f` read its own output back: both are refused before anything is written."""
    src = tmp_path / "in.txt"
    src.write_text("A dog runs.\nTwo cats.\n")
    with src.open("rb") as stdin:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(stdin))
        assert main(["translate", "-m", str(checkpoint), "-o", str(src)]) == 1
        assert one_line_error(capsys) == (
            f"seq2seq translate: error: -o {src} is the file standard input reads; "
            "write the translation elsewhere"
        )
    with src.open("a", encoding="utf-8") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        assert main(["translate", "-m", str(checkpoint), "-i", str(src)]) == 1
    assert "standard output goes to the input file" in one_line_error(capsys)
    assert src.read_text() == "A dog runs.\nTwo cats.\n"


def test_output_to_a_folder_is_one_line_naming_it_before_the_model_loads(tmp_path, capsys):
    src, folder = tmp_path / "in.txt", tmp_path / "out"
    src.write_text("A dog runs.\n")
    folder.mkdir()
    missing = tmp_path / "no.ckpt"  # never reached: the output is checked first
    assert main(["translate", "-m", str(missing), "-i", str(src), "-o", str(folder)]) == 1
    assert one_line_error(capsys) == f"seq2seq translate: error: {folder}: is a directory"


def test_an_existing_output_is_kept_whole_when_the_input_fails(checkpoint, tmp_path, capsys):
    garbage, out = tmp_path / "garbage.gz", tmp_path / "out.txt"
    garbage.write_bytes(b"not gzip at all\n")
    out.write_text("yesterday's translation\n")
    assert main(["translate", "-m", str(checkpoint), "-i", str(garbage), "-o", str(out)]) == 1
    assert "garbage.gz" in one_line_error(capsys)
    assert out.read_text() == "yesterday's translation\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gz", "out.txt"]


def test_an_output_folder_that_does_not_exist_is_named_before_any_model_loads(
    tmp_path, capsys, monkeypatch
):
    """The error names -o as given, not the hidden temporary file it is written under."""
    from seq2seq.inference.translator import Translator

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded for an output that cannot be written")

    monkeypatch.setattr(Translator, "load", load)
    src, out = tmp_path / "in.en", tmp_path / "no" / "such" / "out.de"
    src.write_text("A dog runs.\n")
    assert main(["translate", "-m", str(tmp_path / "run"), "-i", str(src), "-o", str(out)]) == 1
    assert one_line_error(capsys).endswith(f"error: {out}: no such file or directory")


def test_a_failed_model_load_leaves_no_output_behind(tmp_path, capsys):
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    src.write_text("A dog runs.\n")
    assert main(["translate", "-m", str(tmp_path / "run"), "-i", str(src), "-o", str(out)]) == 1
    assert "no such checkpoint file or run directory" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.en"]


def test_attention_into_a_file_is_refused_before_anything_runs(checkpoint, tmp_path, capsys):
    src, taken = tmp_path / "in.en", tmp_path / "taken"
    src.write_text("A dog runs.\n")
    taken.write_text("mine\n")
    args = ["translate", "-m", str(checkpoint), "-i", str(src), "--attention", str(taken)]
    assert main(args) == 1
    assert one_line_error(capsys).endswith(f"--attention {taken}: exists and is not a folder")
    assert taken.read_text() == "mine\n"


def test_a_translation_stopped_midway_leaves_no_output_file(
    checkpoint, tmp_path, monkeypatch, capsys
):
    import seq2seq.inference.translate as translate
    from seq2seq.inference.translator import Translator

    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("A dog.\n" * 5)
    monkeypatch.setattr(translate, "CHUNK_LINES", 2)
    real = Translator.translate_ids
    calls = []

    def interrupted_after_one_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(Translator, "translate_ids", interrupted_after_one_chunk)
    assert main(["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_a_gzip_output_is_complete_and_readable(checkpoint, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.gz"
    src.write_text("A dog runs.\n\nTwo cats.\n")
    assert main(["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(out)]) == 0
    with gzip.open(out, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


def test_a_minimum_length_no_output_can_reach_is_refused(checkpoint, tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("A dog runs.\n")
    code = main(
        ["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(out), "--min-len", "500"]
    )
    assert code == 1
    assert "--min-len 500" in one_line_error(capsys) and not out.exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (("--model.dropout", "1.5"), "model.dropout=1.5"),
        (("--model.attention_dropout", "-0.1"), "model.attention_dropout=-0.1"),
        (("--data.max_tokens", "0"), "data.max_tokens=0"),
        (("--trainer.max_steps", "0"), "trainer.max_steps=0"),
        (("--trainer.max_steps", "-1", "--trainer.max_time_minutes", "null"), "max_steps=-1"),
        (("--trainer.val_check_interval", "0"), "trainer.val_check_interval=0"),
        (("--trainer.save_every_minutes", "0"), "trainer.save_every_minutes=0"),
        (("--decode.max_sentences", "0"), "decode.max_sentences=0"),
        (("--trainer.devices", "0"), "trainer.devices=0 must be at least 1 (or -1"),
        (("--trainer.num_nodes", "0"), "trainer.num_nodes=0 must be at least 1"),
    ],
)
def test_impossible_training_settings_are_one_line_naming_the_key(
    tmp_path, capsys, override, named
):
    code = main(["train", RECIPE, *override, "--run-dir", str(tmp_path / "run")])
    assert code == 1
    err = one_line_error(capsys)
    assert named in err and "multi30k_en_de.yaml" in err
    assert not (tmp_path / "run").exists()


def test_a_recipe_whose_validation_corpus_is_a_list_is_one_clear_line(tmp_path, capsys):
    """data.train may list several corpora; data.valid is one."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  valid:\n    - src: a.en\n      tgt: a.de\n")
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert "r.yaml" in err and "data.valid is a list" in err


def test_an_empty_training_set_is_named(multi30k_slice, tmp_path, capsys):
    overrides = ["--data.root", str(multi30k_slice), "--data.download", "null"]
    code = main(
        ["train", RECIPE, *overrides, "--data.train.max_pairs", "0", "--run-dir", str(tmp_path)]
    )
    assert code == 1
    assert "data.train.max_pairs=0 leaves the train set empty" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"ok\n\xff\xfe\n", "hyp.txt:2: invalid UTF-8"), (b"junk", "not a readable gzip file")],
)
def test_evaluate_names_the_file_and_line_it_cannot_read(tmp_path, capsys, content, message):
    name = "hyp.txt" if b"ok" in content else "hyp.gz"
    hyp, ref = tmp_path / name, tmp_path / "ref.txt"
    hyp.write_bytes(content)
    ref.write_text("a\nb\n")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 1
    err = one_line_error(capsys)
    assert message in err and name in err


def test_evaluate_on_two_empty_files_says_there_is_nothing_to_score(tmp_path, capsys):
    (tmp_path / "h").write_text("")
    (tmp_path / "r").write_text("")
    assert main(["evaluate", "--hyp", str(tmp_path / "h"), "--ref", str(tmp_path / "r")]) == 1
    assert "nothing to score" in one_line_error(capsys)


def test_evaluate_lowercase_is_sacrebleus_case_insensitive_bleu(tmp_path, capsys):
    import sacrebleu

    hyp, ref = tmp_path / "h", tmp_path / "r"
    hyp.write_text("Ein Hund läuft.\nZwei Katzen schlafen.\n")
    ref.write_text("ein hund läuft.\nZwei katzen schlafen.\n")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--lowercase", "--json"]) == 0
    import json

    scores = json.loads(capsys.readouterr().out)
    hyps, refs = hyp.read_text().split("\n")[:2], ref.read_text().split("\n")[:2]
    expected = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True)
    assert scores["bleu"] == pytest.approx(expected.score) == pytest.approx(100.0)
    assert "case:lc" in scores["bleu_signature"]


def test_output_to_dev_stdout_appended_to_a_file_keeps_what_the_file_held(checkpoint, tmp_path):
    """`-o /dev/stdout >> log`: /dev/stdout is then the file itself; replacing it by a renamed
    file, or opening it again (which truncates), lost what the log held."""
    import subprocess
    import sys

    src, log = tmp_path / "in.txt", tmp_path / "log.txt"
    src.write_text("A dog runs.\nTwo cats.\n")
    log.write_text("EARLIER\n")
    command = [sys.executable, "-m", "seq2seq", "translate", "-m", str(checkpoint), "-i", str(src)]
    with log.open("ab") as appended:
        done = subprocess.run([*command, "-o", "/dev/stdout"], stdout=appended, check=False)
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "EARLIER" and len(lines) == 3


def test_average_writes_into_a_named_pipe_rather_than_refusing_or_replacing_it(
    checkpoint, tmp_path
):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(len(fifo.read_bytes())), daemon=True)
    reader.start()
    assert main(["average", str(checkpoint), str(checkpoint), "-o", str(fifo)]) == 0
    reader.join(timeout=30)
    assert got and got[0] > 0 and fifo.is_fifo()


def test_an_exported_model_given_as_a_model_is_named_as_an_export(tmp_path, capsys):
    """`-m` on an export folder (config.json, no recipe.yaml) says what it is, not that a run
    directory has no checkpoints."""
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    src = tmp_path / "in.en"
    src.write_text("A dog runs.\n")
    assert main(["translate", "-m", str(export), "-i", str(src), "-o", str(tmp_path / "o")]) == 1
    err = one_line_error(capsys)
    assert f"{export}: an exported model" in err and "run it was exported from" in err
