"""Decoding batches in parallel streams on a CPU gives every line the hypotheses one stream
gives it, in the input's order, and leaves torch's thread count as it found it."""

import io
import os
import signal
import sys
import threading
import time

import pytest
import torch

import seq2seq.inference.streams as streams_module
import seq2seq.inference.translator as translator_module
from seq2seq.inference.streams import can_fork, cpu_streams, intra_op_threads, map_streams
from seq2seq.inference.translate import progress_bar
from seq2seq.inference.translator import Translator

LINES = [
    "A dog runs on the grass.",
    "Two men are talking.",
    "",
    "A girl in a red coat walks down the street with her mother and a small brown dog.",
    "People.",
    "A man rides a bike.",
    "Children play football in a park near the river.",
    "A woman reads.",
] * 3


@pytest.fixture(autouse=True)
def two_threads():
    """torch's thread count 2 within each test, and what it was after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["processes", "threads"])
def kind(request, monkeypatch) -> str:
    """Streams as forked processes (Linux; whatever threads earlier tests left running) and as
    threads (elsewhere)."""
    if request.param == "processes" and not sys.platform.startswith("linux"):
        pytest.skip("forked streams run on Linux")
    monkeypatch.setattr(streams_module, "can_fork", lambda: request.param == "processes")
    return request.param


@pytest.fixture
def forked(monkeypatch) -> None:
    """Streams as forked processes (Linux only)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("forked streams run on Linux")
    monkeypatch.setattr(streams_module, "can_fork", lambda: True)


def test_map_streams_keeps_the_order_runs_in_several_streams_and_restores_the_thread_count(
    kind,
):
    def fn(x: int) -> tuple[int, int, tuple[int, int]]:
        time.sleep(0.01)  # long enough for every stream to take items
        return x * x, torch.get_num_threads(), (os.getpid(), threading.get_ident())

    out = list(map_streams(fn, range(30), streams=2))
    assert [y for y, _, _ in out] == [x * x for x in range(30)]
    assert {threads for _, threads, _ in out} == {1}  # one intra-op thread per stream
    where = {stream for _, _, stream in out}
    assert len(where) == 2
    if kind == "processes":
        assert len({pid for pid, _ in where}) == 2 and os.getpid() in {pid for pid, _ in where}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("failing", [0, 1, 7])
def test_an_error_in_any_stream_is_raised_and_the_thread_count_restored(kind, failing):
    def fn(x: int) -> int:
        time.sleep(0.01)
        if x == failing:
            raise ValueError(f"bad batch {x}")
        return x

    with pytest.raises(ValueError, match=f"bad batch {failing}"):
        list(map_streams(fn, range(12), streams=2))
    assert torch.get_num_threads() == 2
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_a_stream_process_that_dies_is_reported_not_waited_for(forked):
    parent = os.getpid()

    def fn(x: int) -> int:
        time.sleep(0.01)
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    with pytest.raises(RuntimeError, match="exit code -9"):
        list(map_streams(fn, range(20), streams=2))
    assert torch.get_num_threads() == 2


def test_a_stream_error_that_cannot_be_pickled_arrives_as_its_text(forked):
    parent = os.getpid()

    class Odd(Exception):  # a local class: pickling it fails
        pass

    def fn(x: int) -> int:
        time.sleep(0.01)
        if os.getpid() != parent:
            raise Odd("unpicklable trouble")
        return x

    with pytest.raises(RuntimeError, match="Odd: unpicklable trouble"):
        list(map_streams(fn, range(20), streams=2))


def test_streams_are_threads_while_another_python_thread_runs():
    """A fork copies only the forking thread: a lock another thread holds would stay held in
    the child forever. So no fork while another Python thread runs."""
    if not sys.platform.startswith("linux"):
        pytest.skip("forked streams run on Linux")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not can_fork()
        out = list(map_streams(lambda x: (x, os.getpid()), range(6), streams=2))
    finally:
        release.set()
        other.join()
    assert [x for x, _ in out] == list(range(6))
    assert {pid for _, pid in out} == {os.getpid()}


def test_the_progress_bar_starts_no_thread_that_would_keep_streams_from_forking(monkeypatch):
    """tqdm's monitor thread outlives its bars; translate's bar goes without it."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    before = set(threading.enumerate())
    with progress_bar() as bar:
        bar.update(3)
        assert not bar.disable  # drawn, on a terminal
        assert set(threading.enumerate()) == before
    assert "3 sent" in sys.stderr.getvalue()


def test_streams_are_one_per_thread_on_a_cpu_at_most_one_per_batch_and_one_elsewhere():
    assert cpu_streams(torch.device("cpu"), 5) == 2
    assert cpu_streams(torch.device("cpu"), 1) == 1
    assert cpu_streams(torch.device("cuda"), 5) == 1


@pytest.mark.parametrize("beam", [1, 3])
def test_several_streams_give_each_line_what_one_stream_gives_it(
    checkpoint, monkeypatch, beam, kind
):
    translator = Translator.load(checkpoint, "cpu", "fp32")
    cfg = translator.settings(beam=beam, nbest=2 if beam > 1 else 1, max_tokens=40)
    src = translator.encode(LINES)
    monkeypatch.setattr(translator_module, "cpu_streams", lambda device, n: min(3, n))
    torch.set_num_threads(1)  # both sides on one intra-op thread per batch: exactly equal
    try:
        three = translator.translate_ids(src, cfg)
        # The same batches (cut for three streams), decoded one after another in this thread.
        in_one = lambda fn, items, streams: map_streams(fn, items, 1)  # noqa: E731
        monkeypatch.setattr(translator_module, "map_streams", in_one)
        one = translator.translate_ids(src, cfg)
    finally:
        torch.set_num_threads(2)
    assert len(three) == len(LINES) and three[2] == []  # the blank line
    assert [[h.tokens for h in hyps] for hyps in three] == [
        [h.tokens for h in hyps] for hyps in one
    ]
    assert [[h.score for h in hyps] for hyps in three] == [[h.score for h in hyps] for hyps in one]
