"""`seq2seq bench -m MODEL --against ctranslate2 --whole-process`: the two commands a user runs,
timed from start to exit, start-up and loading included: `seq2seq translate` of a file, and the
same file through CTranslate2's Python API alone (`ct2_file.py`, a script that imports neither
torch nor seq2seq).

Both translate the test sources with the length penalty off, by CTranslate2's stopping rule
(ours: `--stop best`), in batches of the model's `decode.max_tokens` tokens (or at most
`--max-sentences` sentences), on the same number of threads; each keeps its own length limit
(ours a * |x| + b, CTranslate2's one number: the model's positions less one, at most its
default of 256). Rounds alternate the engines; each figure is
the median over rounds, after one unmeasured round of each (the page cache). Start-up alone is
the same commands on a one-line file.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seq2seq.export.compare import search_figures
from seq2seq.inference.checkpoint import load_model

SCRIPT = Path(__file__).with_name("ct2_file.py")


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
) -> dict:
    """Sentences/s of each whole command (greedy and beam 5), their ratio, BLEU, identical
    lines, and each command's seconds on one line (start-up and loading); ours stops beam
    search by `stop` (CTranslate2's own rule, 'best', unless told)."""
    from seq2seq.export import export

    loaded = load_model(model_path)
    max_tokens = loaded.decode.max_tokens
    max_length = min(256, loaded.model.cfg.max_positions - 1)  # search.max_output_lengths' cap
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result: dict = {
        "against": "ctranslate2",
        "whole_process": True,
        "sentences": len(sources),
        "rounds": rounds,
        "threads": threads,
        "settings": (
            f"whole processes on the CPU: `seq2seq translate --precision {precision}` vs "
            f"{SCRIPT.name} (ctranslate2 {compute_type}); {threads} threads each; batches of "
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
            theirs += ["--beam", str(beam), "--threads", str(threads)]
            theirs += ["--compute-type", compute_type, "--max-tokens", str(max_tokens), *batch]
            theirs += ["--max-decoding-length", str(max_length), "--max-input-length"]
            theirs += [str(loaded.model.cfg.max_positions)]  # translate's truncation, EOS included
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
