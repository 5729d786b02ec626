"""kill -9 at random moments of a real `seq2seq train` process, then the same command again:
every run ends as if it had never been killed (bit-identical weights, the whole log)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import RECIPE, assert_same_history, parameters, tiny_overrides

#: Kill moments per test run: random, from the start of the process (data preparation,
#: tokenizer training) to its end (checkpoint saving, averaging, the final decoding).
KILLS = 10


def command(multi30k_slice: Path, run: Path) -> list[str]:
    extra = ("--trainer.max_steps", "30", "--trainer.val_check_interval", "10")
    extra += ("--trainer.save_every_minutes", "0.002")  # timed saves between validations too
    overrides = tiny_overrides(multi30k_slice, run / "cache", *extra)
    return [sys.executable, "-m", "seq2seq", "train", RECIPE, *overrides, "--run-dir", str(run)]


def run_to_end(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - start


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_ends_as_if_never_killed(
    multi30k_slice, tmp_path
):
    straight = tmp_path / "straight"
    wall = run_to_end(command(multi30k_slice, straight))
    expected = parameters(straight / "checkpoints" / "last.ckpt")
    rng = random.Random(20261201)
    for kill in range(KILLS):
        run = tmp_path / f"killed{kill}"
        argv = command(multi30k_slice, run)
        moment = rng.uniform(0.5, wall)
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            process.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if not (run / "results.json").exists():  # killed before the very end
            run_to_end(argv)
        got = parameters(run / "checkpoints" / "last.ckpt")
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=f"{kill}: {name}")
        assert (run / "results.json").is_file()
        assert_same_history(straight, run)


def test_sigterm_stops_training_with_one_line_saying_how_to_resume_and_exit_143(
    multi30k_slice, tmp_path
):
    run = tmp_path / "run"
    argv = command(multi30k_slice, run)
    argv[argv.index("30")] = "100000"  # --trainer.max_steps: still training when signalled
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():  # training has begun
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143
    last = err.strip().splitlines()[-1]
    assert (
        last
        == f"seq2seq train: terminated: run the same command to resume {run} from its last checkpoint"
    )
