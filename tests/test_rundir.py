"""The run directory: every name in one place; --overwrite removes only what a run wrote."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from seq2seq.atomic import atomic_file, temporary_name, write_atomically
from seq2seq.cli import main
from seq2seq.rundir import RunDir


def fake_run(path: Path) -> RunDir:
    """A run directory with one file of every kind a run writes."""
    run = RunDir(path)
    for rel in (
        "recipe.yaml",
        "results.json",
        "train_state.json",
        "curves.png",
        ".prepare.lock",
        "spm.model",
        "spm.vocab",
        "checkpoints/last.ckpt",
        "checkpoints/averaged.ckpt",
        "checkpoints/step0000200-bleu30.10.ckpt",
        "checkpoints/recent-step0000200.ckpt",
        "logs/metrics.csv",
        "logs/metrics-001-until0000100.csv",
        "logs/hparams.yaml",
        "logs/events.out.tfevents.1.vm.2.0",
        "cache/tok-abc.arrow",
        "cache/clean-abc.arrow",
        "cache/read/generator/default/0.0.0/x.arrow",
        ".recipe.yaml.4242.tmp",
        "checkpoints/.last.ckpt.4242.tmp",
        ".spm-training-k3j_x9q2/input.txt",
        "logs/.metrics.csv.4242.tmp",
    ):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text("x")
    return run


def test_clear_removes_every_file_a_run_writes(tmp_path):
    run = fake_run(tmp_path / "run")
    assert run.foreign() == []
    run.clear()
    assert list(run.path.iterdir()) == []


def test_overwrite_refuses_a_folder_holding_a_users_files_and_removes_nothing(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    for rel in ("logs/mine.txt", "cache/x", "notes/todo.txt"):
        (run.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.path / rel).write_text("mine")
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))
    assert run.foreign() == ["cache/x", "logs/mine.txt", "notes/"]
    code = main(["train", "recipes/multi30k_en_de.yaml", "--run-dir", str(run.path), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "cache/x" in err and "logs/mine.txt" in err and "notes/" in err
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before


def test_a_users_checkpoint_or_hidden_file_in_a_run_is_theirs_and_refused(tmp_path):
    """Only the names a run gives are the run's: an average a user wrote into checkpoints/,
    a hidden .tmp file or a folder that merely starts like SentencePiece's are not."""
    run = fake_run(tmp_path / "run")
    mine = ["checkpoints/mine.ckpt", ".notes.tmp", ".notes.v2.tmp", ".spm-myfiles1/data.txt"]
    mine += ["checkpoints/.my.ckpt.1.tmp", "cache/tmp_my_notes.txt"]
    for rel in mine:
        (run.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.path / rel).write_text("mine")
    assert run.foreign() == [
        ".notes.tmp",
        ".notes.v2.tmp",
        ".spm-myfiles1/",
        "cache/tmp_my_notes.txt",
        "checkpoints/.my.ckpt.1.tmp",
        "checkpoints/mine.ckpt",
    ]
    with pytest.raises(ValueError, match=r"\.notes\.tmp, .* and 1 more; move those away"):
        run.clear()
    assert (run.path / "checkpoints" / "mine.ckpt").read_text() == "mine"


def test_a_resumed_runs_earlier_metrics_are_set_aside_not_deleted(tmp_path):
    run = RunDir(tmp_path)
    run.logs.mkdir()
    run.metrics.write_text("step,train_loss\n50,3.0\n")
    run.keep_metrics_for_resume(100)
    run.metrics.write_text("step,train_loss\n150,2.0\n")
    run.keep_metrics_for_resume(100)  # killed again before the next checkpoint
    assert [(step, p.name) for step, p in run.earlier_metrics()] == [
        (100, "metrics-001-until0000100.csv"),
        (100, "metrics-002-until0000100.csv"),
    ]
    assert not run.metrics.exists()


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "results.json"
    write_atomically(path, "old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_atomic_write_through_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real.txt").write_text("old\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    write_atomically(tmp_path / "link.txt", "new\n")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


def test_an_atomic_write_to_a_named_pipe_writes_into_it_and_leaves_the_pipe(tmp_path):
    """A path that is no regular file (a pipe, a device such as /dev/null) is written in
    place, as a shell's `>` would: renaming a file over it would destroy it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_atomically(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert got == ["through the pipe\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_an_atomic_write_to_a_folder_is_refused_at_once_naming_the_folder(tmp_path):
    with pytest.raises(IsADirectoryError) as err, atomic_file(tmp_path):
        raise AssertionError("a folder must not be opened")
    assert err.value.filename == str(tmp_path)


def test_a_long_file_name_is_written_atomically_under_a_temporary_name_that_fits(tmp_path):
    path = tmp_path / ("x" * 250)
    assert len(temporary_name(path).name.encode()) <= 255
    write_atomically(path, "whole\n")
    assert path.read_text() == "whole\n"


@pytest.mark.parametrize(
    ("row", "why"),
    [("40,2.5,9\n", "more fields than the header names"), ("40,lots\n", "not a number")],
)
def test_plot_names_the_line_of_a_damaged_metrics_log(tmp_path, capsys, row, why):
    run = RunDir(tmp_path)
    run.logs.mkdir()
    run.metrics.write_text("step,train_loss\n20,3.0\n" + row)
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"seq2seq plot: error: {run.metrics}:3: {why}") and "\n" not in err


def test_the_joined_log_reads_a_last_attempt_that_logged_nothing(tmp_path):
    from seq2seq.training.plot import read_metrics

    run = RunDir(tmp_path)
    run.logs.mkdir()
    # Validations after updates 10 and 20 log at rows 9 and 19.
    run.metrics.write_text("step,val_bleu\n9,1.0\n19,2.0\n")
    run.keep_metrics_for_resume(20)  # resumed at max_steps: nothing more is logged
    assert read_metrics(tmp_path)["val_bleu"] == [(9, 1.0), (19, 2.0)]


def test_a_resume_from_a_log_step_keeps_one_row_per_update(tmp_path):
    """Update k logs at row k - 1. Resumed from global step 9, the earlier attempt's row 9
    (update 10, trained again after the resume) gives way to the next attempt's."""
    from seq2seq.training.plot import read_metrics

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics-001-until0000009.csv").write_text("epoch,lr,step\n0,0.1,4\n0,0.2,9\n")
    (logs / "metrics.csv").write_text("epoch,lr,step\n0,0.25,9\n0,0.3,14\n")
    assert read_metrics(tmp_path)["lr"] == [(4, 0.1), (9, 0.25), (14, 0.3)]


def test_a_run_held_by_one_command_is_refused_to_another(multi30k_slice, tmp_path, capsys):
    """Two `train` (or `prepare`) commands on one run directory: the second resumed from the
    first's checkpoints and moved its live log aside. Now it is one line and touches nothing."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with run.hold():
        for command in ("train", "prepare"):
            argv = [command, "recipes/multi30k_en_de.yaml", "--run-dir", str(run.path)]
            assert main([*argv, "--data.root", str(multi30k_slice)]) == 1
            assert capsys.readouterr().err.strip() == (
                f"seq2seq {command}: error: {run.path}: another seq2seq command is training or "
                f"preparing this run (it holds {run.path / '.run.lock'}); wait for it to end, "
                "or use another --run-dir"
            )
    assert [p.name for p in run.path.iterdir()] == [".run.lock"]
    with run.hold():  # released: the next command may hold it
        pass


def test_staged_files_of_killed_processes_are_removed_and_others_kept(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead, alive = int(finished.stdout), os.getpid()
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    names = [f".results.json.{dead}.tmp", f".results.json.{alive}.tmp", ".notes.v2.tmp"]
    names += [f"checkpoints/.last.ckpt.{dead}.tmp", ".spm-training-k3j_x9q2/input.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = run.remove_stale_staged()  # and a killed SentencePiece training's folder
    assert sorted(p.name for p in removed) == [
        f".last.ckpt.{dead}.tmp",
        f".results.json.{dead}.tmp",
        ".spm-training-k3j_x9q2",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".results.json.{alive}.tmp", ".notes.v2.tmp", "checkpoints"]
    )
