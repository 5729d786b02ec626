"""Decoding batches in parallel streams on a CPU gives every line the hypotheses one stream
gives it, in the input's order, and leaves torch's thread count as it found it."""

import threading

import pytest
import torch

import seq2seq.inference.translator as translator_module
from seq2seq.inference.streams import cpu_streams, intra_op_threads, map_streams
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


def test_map_streams_keeps_the_order_runs_on_several_threads_and_restores_the_thread_count():
    seen: set[int] = set()
    barrier = threading.Barrier(2, timeout=10)  # both workers must be inside fn at once

    def fn(x: int) -> tuple[int, int]:
        seen.add(threading.get_ident())
        if x < 2:
            barrier.wait()
        return x * x, torch.get_num_threads()

    out = list(map_streams(fn, range(10), streams=2))
    assert [y for y, _ in out] == [x * x for x in range(10)]
    assert {threads for _, threads in out} == {1}  # one intra-op thread per stream
    assert len(seen) == 2
    assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_when_a_batch_fails():
    def fn(x: int) -> int:
        if x == 3:
            raise ValueError("bad batch")
        return x

    with pytest.raises(ValueError, match="bad batch"):
        list(map_streams(fn, range(6), streams=2))
    assert torch.get_num_threads() == 2
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_streams_are_one_per_thread_on_a_cpu_at_most_one_per_batch_and_one_elsewhere():
    assert cpu_streams(torch.device("cpu"), 5) == 2
    assert cpu_streams(torch.device("cpu"), 1) == 1
    assert cpu_streams(torch.device("cuda"), 5) == 1


@pytest.mark.parametrize("beam", [1, 3])
def test_several_streams_give_each_line_what_one_stream_gives_it(checkpoint, monkeypatch, beam):
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
