"""CTranslate2 in processes of its own, for `seq2seq bench -m MODEL --against ctranslate2`:
`ct2_file.py` translates a file through CTranslate2's Python API alone, a script that imports
neither torch nor seq2seq.

`Ct2Worker` keeps one such process for the decoding comparison (seq2seq.export.compare): the
model loaded once, the file decoded again per call, its decode alone timed inside it.

`compare_processes` (`--whole-process`) times the two commands a user runs from start to exit,
start-up and loading included: `seq2seq translate` of a file, and `ct2_file.py` on the same
file.

Both translate the test sources with the length penalty off, by CTranslate2's stopping rule
(ours: `--stop best`), in batches of the model's `decode.max_tokens` tokens (or at most
`--max-sentences` sentences), on the same number of threads; each keeps its own length limit
(ours a * |x| + b, CTranslate2's one number: the model's positions less one, at most its
default of 256). Rounds alternate the engines; each figure is
the median over rounds, after one unmeasured round of each (the page cache). Start-up alone is
the same commands on a one-line file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seq2seq.export.compare import search_figures
from seq2seq.inference.checkpoint import LoadedModel, load_model

SCRIPT = Path(__file__).with_name("ct2_file.py")


def ct2_length_limit(loaded: LoadedModel) -> int:
    """CTranslate2's one length limit in bench: the model's positions less one (search's cap),
    at most CTranslate2's default of 256."""
    return min(256, loaded.model.cfg.max_positions - 1)


def ct2_file_args(
    loaded: LoadedModel,
    threads: int,
    compute_type: str,
    max_sentences: int | None,
    inter_threads: int | None = None,
) -> list[str]:
    """ct2_file.py's options after its three paths: `threads` threads in all, spent as
    `ct2_threads` says, CTranslate2's own batches of the model's `decode.max_tokens` tokens
    (or of at most `max_sentences` sentences), one length limit (`ct2_length_limit`) and
    translate's truncation."""
    inter, intra = ct2_threads(threads, inter_threads)
    args = ["--threads", str(intra), "--inter-threads", str(inter), "--compute-type", compute_type]
    args += ["--max-tokens", str(loaded.decode.max_tokens)]
    args += ["--max-sentences", str(max_sentences)] if max_sentences else []
    args += ["--max-decoding-length", str(ct2_length_limit(loaded))]
    args += ["--max-input-length", str(loaded.model.cfg.max_positions)]  # EOS included
    return args


def ct2_threads(threads: int, inter_threads: int | None) -> tuple[int, int]:
    """How CTranslate2 spends `threads` threads: (inter_threads, intra_threads), that is
    `inter_threads` batches side by side (None: one per thread, as ours runs one stream per
    thread), each on threads // inter_threads intra-op threads (at least one)."""
    inter = threads if inter_threads is None else inter_threads
    return inter, max(1, threads // inter)


def ct2_threading(threads: int, inter_threads: int | None) -> str:
    """`ct2_threads` in the bench's settings line."""
    inter, intra = ct2_threads(threads, inter_threads)
    return f"inter_threads={inter}, intra_threads={intra}"


def ct2_kernel_lines(log: str, compute_type: str) -> str:
    """The CPU kernels CTranslate2 said it chose in its info log: its "Selected ISA" line and
    its float32 (SGEMM) or int8 (GEMM_S8) backend line, joined by "; " ("" if none)."""
    gemm = "GEMM_S8 backend:" if compute_type.startswith("int8") else "SGEMM backend:"
    keep = ("Selected ISA:", gemm)
    said = [
        line.split("]")[-1].strip(" -") for line in log.splitlines() if any(k in line for k in keep)
    ]
    return "; ".join(said)


class Ct2Worker:
    """`ct2_file.py --serve` on `sources`: CTranslate2 with the model in `folder` loaded once,
    in a process of its own; each call decodes every source again.

    A context manager: the process ends on exit. A failure (the process died, or answered
    something else) raises RuntimeError with the last line it wrote to stderr.
    """

    def __init__(self, folder: Path, sources: list[str], tmp: Path, args: list[str], env: dict):
        self.input, self.output, self.log = tmp / "ct2.in", tmp / "ct2.out", tmp / "ct2.log"
        self.input.write_text("".join(line + "\n" for line in sources), encoding="utf-8")
        command = [sys.executable, str(SCRIPT), str(folder), str(self.input), str(self.output)]
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [*command, *args, "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self._answer("ready")

    def _answer(self, key: str):
        line = self.process.stdout.readline()
        try:
            return json.loads(line)[key]
        except (ValueError, KeyError, TypeError):
            self.close()
            lines = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            said = (lines or [line.strip() or "(no output)"])[-1]
            raise RuntimeError(f"{SCRIPT.name} --serve failed: {said}") from None

    def kernels(self, compute_type: str) -> str:
        """What CTranslate2 logged choosing its CPU kernels (`ct2_kernel_lines`)."""
        return ct2_kernel_lines(
            self.log.read_text(encoding="utf-8", errors="replace"), compute_type
        )

    def __call__(self, beam: int) -> tuple[float, list[str]]:
        """Decode every source with beam size `beam`: the decode's seconds, the output lines."""
        self.process.stdin.write(json.dumps({"beam": beam}) + "\n")
        self.process.stdin.flush()
        seconds = float(self._answer("seconds"))
        return seconds, self.output.read_text(encoding="utf-8").splitlines()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Ct2Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of `command`; a failure raises with its last line of stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed: {said}")
    return seconds


def compare_processes(
    model_path: str,
    sources: list[str],
    refs: list[str],
    threads: int,
    rounds: int = 3,
    max_sentences: int | None = None,
    precision: str = "fp32",
    compute_type: str = "float32",
    stop: str = "best",
    inter_threads: int | None = None,
) -> dict:
    """Sentences/s of each whole command (greedy and beam 5), their ratio, BLEU, identical
    lines, and each command's seconds on one line (start-up and loading); ours stops beam
    search by `stop` (CTranslate2's own rule, 'best', unless told); CTranslate2 decodes
    `inter_threads` batches side by side (None: one per thread, as ours does)."""
    from seq2seq.export import export

    loaded = load_model(model_path)
    max_tokens = loaded.decode.max_tokens
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result: dict = {
        "against": "ctranslate2",
        "whole_process": True,
        "sentences": len(sources),
        "rounds": rounds,
        "threads": threads,
        "settings": (
            f"whole processes on the CPU: `seq2seq translate --precision {precision}` vs "
            f"{SCRIPT.name} (ctranslate2 {compute_type}, {ct2_threading(threads, inter_threads)}); "
            f"{threads} threads each; batches of "
            + (f"{max_tokens} tokens" if max_sentences is None else f"{max_sentences} sentences")
            + f"; length penalty off; CTranslate2's stop rule (ours: --stop {stop})"
        ),
    }
    with tempfile.TemporaryDirectory(prefix="seq2seq-bench-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "ctranslate2"
        export(model_path, "ctranslate2", folder)
        inputs = {"all": tmp / "src.txt", "one": tmp / "one.txt"}
        inputs["all"].write_text("".join(line + "\n" for line in sources), encoding="utf-8")
        inputs["one"].write_text(sources[0] + "\n", encoding="utf-8")

        def commands(beam: int, src: Path) -> dict[str, tuple[list[str], Path]]:
            batch = ["--max-sentences", str(max_sentences)] if max_sentences else []
            ours_out, theirs_out = tmp / f"ours.{beam}.txt", tmp / f"ct2.{beam}.txt"
            ours = [sys.executable, "-m", "seq2seq", "translate", "-m", str(model_path)]
            ours += ["-i", str(src), "-o", str(ours_out), "--beam", str(beam), "--lenpen", "0"]
            ours += ["--stop", stop, "--precision", precision, "--device", "cpu", *batch]
            theirs = [sys.executable, str(SCRIPT), str(folder), str(src), str(theirs_out)]
            theirs += ["--beam", str(beam)]
            theirs += ct2_file_args(loaded, threads, compute_type, max_sentences, inter_threads)
            return {"ours": (ours, ours_out), "ctranslate2": (theirs, theirs_out)}

        for name, beam, src in (("greedy", 1, "all"), ("beam5", 5, "all"), ("startup", 1, "one")):
            runs = commands(beam, inputs[src])
            seconds: dict[str, list[float]] = {k: [] for k in runs}
            for command, _ in runs.values():  # warm-up, unmeasured
                _run(command, env)
            for _ in range(rounds):
                for k, (command, _) in runs.items():
                    seconds[k].append(_run(command, env))
            if name == "startup":
                for k in runs:
                    result[f"one_line_{k}_s"] = round(statistics.median(seconds[k]), 2)
                continue
            texts = {
                k: out.read_text(encoding="utf-8").splitlines() for k, (_, out) in runs.items()
            }
            result.update(search_figures(name, "ctranslate2", seconds, texts, refs))
    return result
