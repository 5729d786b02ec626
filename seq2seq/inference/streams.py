"""Decoding several batches at once on a CPU: one stream per core.

A decoding step is hundreds of small operations. torch splits each one over its intra-op
threads, and for operations this small a second thread does not double the speed: on a 2-core
Xeon the default recipe's model decoded greedy at 194-224 sentences/s on one thread and
278-290 on two. Independent batches scale better: S streams, each decoding its own batches
with one intra-op thread.

On Linux the streams are processes: this one and S - 1 forked from it, which share the model's
memory (copy-on-write) and send their hypotheses back. Threads would share one interpreter,
and the Python between a step's operations takes turns under its lock: two threads decoded
the default recipe's beam 5 about 5% slower than two processes on that Xeon, greedy 3%
(`can_fork` says where the streams are threads instead: macOS, Windows, a daemonic process,
a process running other Python threads).

Each batch is searched exactly as on its own, in one thread: the output is the same as one
stream's with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import queue
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: Seconds between checks that the stream processes are alive while waiting for a result.
POLL_SECONDS = 1.0


def cpu_streams(device: torch.device, n_batches: int) -> int:
    """How many streams decode `n_batches` batches: one per torch thread on a CPU (at most one
    per batch); one elsewhere (an accelerator runs a batch's operations by itself)."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n_batches))


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` within, restored after (it is per process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def can_fork() -> bool:
    """Whether streams may be forked processes: on Linux (fork is unsafe on macOS and missing
    on Windows), from a process that may have children (not a daemonic one) and runs no other
    Python thread, which might hold a lock at the fork that a child would wait on forever."""
    return (
        sys.platform.startswith("linux")
        and not multiprocessing.current_process().daemon
        and threading.active_count() == 1
    )


def stream_kind() -> str:
    """What `map_streams` runs its streams as here: "processes" or "threads"."""
    return "processes" if can_fork() else "threads"


def map_streams(fn: Callable[[T], R], items: Iterable[T], streams: int) -> Iterator[R]:
    """fn of each item, in the items' order, computed by `streams` streams of one intra-op
    thread each: processes where `can_fork`, else threads (in this thread alone when streams
    is 1). Each stream takes the next item not taken yet. torch's thread count is 1 in this
    process until the last result has been taken. An exception in any stream is raised here."""
    if streams <= 1:
        yield from map(fn, items)
        return
    if can_fork():
        yield from _map_processes(fn, list(items), streams)
        return
    with intra_op_threads(1), ThreadPoolExecutor(streams, thread_name_prefix="decode") as pool:
        yield from pool.map(fn, items)


def _map_processes(fn: Callable[[T], R], items: Sequence[T], streams: int) -> Iterator[R]:
    """map_streams with this process and streams - 1 forked ones."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()  # a child's puts never wait for this process to read
    taken = context.Value("q", 0)

    def take() -> int | None:
        with taken.get_lock():
            i = taken.value
            taken.value = i + 1
        return i if i < len(items) else None

    def child() -> None:
        # The parent's handlers are not this process's: SIGTERM (`terminate`) just ends it,
        # Ctrl-C reaches the parent, which ends it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(1)
        try:
            while (i := take()) is not None:
                results.put((i, fn(items[i])))
        except BaseException as error:  # noqa: BLE001 - every failure goes to the parent
            results.put((-1, _picklable(error)))

    ready: dict[int, R] = {}

    def receive(block: bool) -> None:
        """Move the children's results into `ready`; raise a child's error."""
        while True:
            try:
                i, result = results.get(block=block, timeout=POLL_SECONDS if block else None)
            except queue.Empty:
                if block:
                    _check_alive(children)
                return
            if i < 0:
                raise result
            ready[i] = result
            block = False

    with intra_op_threads(1):
        children = [context.Process(target=child, daemon=True) for _ in range(streams - 1)]
        next_out = 0
        try:
            with warnings.catch_warnings():
                # Python >= 3.12 warns of any thread at a fork: torch's idle intra-op threads
                # count, but no other Python thread runs (`can_fork`).
                warnings.filterwarnings("ignore", "This process .* is multi-threaded")
                for process in children:
                    process.start()
            working = True  # this process takes items too, until none is left
            while next_out < len(items):
                if working and (i := take()) is not None:
                    ready[i] = fn(items[i])
                else:
                    working = False
                receive(block=not working and next_out not in ready)
                while next_out in ready:
                    yield ready.pop(next_out)
                    next_out += 1
        finally:  # done (the children are ending), failed, or no longer read from
            for process in children:
                if next_out < len(items) and process.is_alive():
                    process.terminate()
                process.join()
            results.close()


def _check_alive(children: list[multiprocessing.process.BaseProcess]) -> None:
    """Raise if a stream process ended abnormally (killed, out of memory) without a word."""
    for process in children:
        if process.exitcode not in (None, 0):
            raise RuntimeError(
                f"a decoding stream process ended with exit code {process.exitcode} "
                "(killed, or out of memory?)"
            )


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to be raised in the parent as it is), else a
    RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
