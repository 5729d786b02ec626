"""Every file name inside a run directory, in one place.

A run directory holds:
    recipe.yaml                 the resolved recipe
    spm.model / spm.vocab       the SentencePiece model (spm.src.* + spm.tgt.* when not joint)
    spm.json                    what it was trained on (data and settings), checked on reuse
    checkpoints/stepNNNNNNN-bleuXX.XX.ckpt   best k by validation BLEU
    checkpoints/recent-stepNNNNNNN.ckpt      the last N validations' (trainer.keep_last)
    checkpoints/last.ckpt       the latest state (resume point)
    checkpoints/averaged.ckpt   the average of the last N checkpoints (trainer.average_last)
    logs/                       TensorBoard events, metrics.csv (and metrics-K-untilNNNNNNN.csv,
                                attempt K's rows of a run resumed at step N), hparams.yaml
    cache/                      Arrow caches of the read, tokenized and cleaned splits
    train_state.json, curves.png, results.json, .prepare.lock

`seq2seq train --overwrite` removes exactly these, and refuses a folder that holds anything
else, so it never deletes what a run did not write.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

RECIPE = "recipe.yaml"
RESULTS = "results.json"
TRAIN_STATE = "train_state.json"
CURVES = "curves.png"
#: Held while a run's data is prepared (ranks started together take turns).
PREPARE_LOCK = ".prepare.lock"
#: Held by the command that trains or prepares the run (`RunDir.hold`).
RUN_LOCK = ".run.lock"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
CACHE = "cache"
#: Beside the SentencePiece model(s): what they were trained on (seq2seq.data.tokenizer).
SPM_TRAINED_ON = "spm.json"
#: The folder SentencePiece trains in, beside its model, then tempfile's 8 characters.
SPM_TRAINING_PREFIX = ".spm-training-"
LAST = "last.ckpt"
AVERAGED = "averaged.ckpt"
METRICS = "metrics.csv"
#: ModelCheckpoint's file name patterns (Lightning fills in the fields).
BEST_PATTERN = "step{step:07d}-bleu{val_bleu:.2f}"
RECENT_PATTERN = "recent-step{step:07d}"

_BEST = re.compile(r"^step(\d+)-bleu(.*)\.ckpt$")
_RECENT = re.compile(r"^recent-step(\d+)\.ckpt$")
_EARLIER_METRICS = re.compile(r"^metrics-(\d+)-until(\d+)\.csv$")


def _staged(*names: str) -> tuple[str, ...]:
    """seq2seq.atomic's staged files of `names` (glob patterns too), `.NAME.PID.tmp`: a
    user's `.notes.v2.tmp` is none of them."""
    return tuple(f".{name}.[0-9]*.tmp" for name in names)


#: A run's checkpoint names: the best k, the recent ones, last and averaged.
_CHECKPOINT_FILES = ("step*-bleu*.ckpt", "recent-step*.ckpt", LAST, AVERAGED)

#: What a run writes, folder by folder (glob patterns); a name ending in "/" is a folder
#: whose whole content belongs to the library that writes it (the caches, and the folder
#: SentencePiece trains in: SPM_TRAINING_PREFIX and tempfile's 8 characters).
_WRITTEN: dict[str, tuple[str, ...]] = {
    "": (
        RECIPE,
        RESULTS,
        TRAIN_STATE,
        *_staged(RECIPE, RESULTS, TRAIN_STATE, SPM_TRAINED_ON),
        CURVES,
        PREPARE_LOCK,
        RUN_LOCK,
        "spm.model",
        "spm.vocab",
        "spm.src.model",
        "spm.src.vocab",
        "spm.tgt.model",
        "spm.tgt.vocab",
        SPM_TRAINED_ON,
        SPM_TRAINING_PREFIX + "????????/",
        CHECKPOINTS + "/",
        LOGS + "/",
        CACHE + "/",
    ),
    # The names of rundir's patterns only: a checkpoint a user put here (an average of their
    # own, say) is not the run's.
    CHECKPOINTS: (*_CHECKPOINT_FILES, *_staged(*_CHECKPOINT_FILES)),
    LOGS: (
        METRICS,
        *_staged(METRICS),
        "metrics-*-until*.csv",
        "hparams.yaml",
        "events.out.tfevents.*",
    ),
    CACHE: (
        "tok-*.arrow",
        "clean-*.arrow",
        "read-*.arrow",
        "cache-*.arrow",
        "tmp????????",  # datasets' tempfile names
        "*.lock",
        "read/",
    ),
}


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def train_state(self) -> Path:
        return self.path / TRAIN_STATE

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def prepare_lock(self) -> Path:
        return self.path / PREPARE_LOCK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def averaged(self) -> Path:
        return self.checkpoints / AVERAGED

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def metrics(self) -> Path:
        return self.logs / METRICS

    @property
    def cache(self) -> Path:
        return self.path / CACHE

    # ---- checkpoints ---------------------------------------------------------------------

    def best(self) -> list[tuple[int, float | None, Path]]:
        """(step, validation BLEU, path) of every best-k checkpoint; BLEU is None when the
        name carries no number."""
        found = []
        for path in self.checkpoints.glob("step*-bleu*.ckpt"):
            match = _BEST.match(path.name)
            if match:
                found.append((int(match.group(1)), _number(match.group(2)), path))
        return found

    def ranked(self) -> list[Path]:
        """Best-k checkpoints, best validation BLEU first (ties: later step first)."""
        scored = [(bleu, step, p) for step, bleu, p in self.best() if bleu is not None]
        return [p for _, _, p in sorted(scored, reverse=True)]

    def best_by_step(self) -> list[Path]:
        """The best-k checkpoints, oldest step first."""
        return [p for _, _, p in sorted(self.best(), key=lambda kept: kept[0])]

    def recent(self) -> list[Path]:
        """The checkpoints of the last validations (trainer.keep_last), oldest step first."""
        return [p for _, p in self._recent_steps()]

    def _recent_steps(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.checkpoints.glob("recent-step*.ckpt"):
            match = _RECENT.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def kept_newest_first(self) -> list[Path]:
        """The best-k and last-N checkpoints together, newest step first (a resume's
        fallbacks when last.ckpt is unreadable)."""
        steps = [(step, p) for step, _, p in self.best()] + self._recent_steps()
        return [p for _, p in sorted(steps, key=lambda kept: kept[0], reverse=True)]

    # ---- logs across resumes -------------------------------------------------------------

    def earlier_metrics(self) -> list[tuple[int, Path]]:
        """(resume step, file) of the CSV logs of a resumed run's earlier attempts, oldest
        first: attempt K's rows, of which those after the step the next attempt resumed
        from were trained again (see `plot.read_metrics`)."""
        found = []
        for path in self.logs.glob("metrics-*-until*.csv"):
            match = _EARLIER_METRICS.match(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return [(until, path) for _, until, path in sorted(found)]

    def keep_metrics_for_resume(self, step: int) -> None:
        """Before a resume from `step`: set the current metrics.csv aside as
        metrics-K-until{step}.csv (Lightning's CSV logger would delete it)."""
        if self.metrics.is_file():
            attempt = len(self.earlier_metrics()) + 1
            self.metrics.replace(self.logs / f"metrics-{attempt:03d}-until{step:07d}.csv")

    # ---- ownership -----------------------------------------------------------------------

    def foreign(self) -> list[str]:
        """Entries a run does not write (relative paths, sorted): `clear` leaves them and
        `--overwrite` refuses while there are any."""
        found: list[str] = []
        for folder, patterns in _WRITTEN.items():
            here = self.path / folder
            if not here.is_dir():
                continue
            for entry in sorted(here.iterdir()):
                name = entry.name + ("/" if entry.is_dir() else "")
                if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    found.append(os.path.join(folder, name))
        return sorted(found)

    def clear(self) -> None:
        """Remove an earlier run's files, exactly those a run writes. Refuses (ValueError)
        when the folder holds anything else, naming it."""
        foreign = self.foreign()
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise ValueError(
                f"{self.path}: --overwrite removes only what a run writes, and this folder also "
                f"holds {shown}; move those away or choose another --run-dir"
            )
        for folder in (CHECKPOINTS, LOGS, CACHE):
            if (self.path / folder).is_dir():
                shutil.rmtree(self.path / folder)
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry.is_dir():
                shutil.rmtree(entry)  # SentencePiece's (foreign() let only run folders through)
            elif entry.name != RUN_LOCK:  # held by this command: another must still find it
                entry.unlink()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the run directory (an existing folder) for one command: a second `train` or
        `prepare` on it meanwhile is refused in one line, instead of resuming from the first
        one's checkpoints and moving its live log aside."""
        lock = FileLock(self.path / RUN_LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(
                f"{self.path}: another seq2seq command is training or preparing this run "
                f"(it holds {self.path / RUN_LOCK}); wait for it to end, or use another --run-dir"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def remove_stale_staged(self) -> list[Path]:
        """Remove what processes killed while writing left: staged files (`.NAME.PID.tmp`,
        seq2seq.atomic) of processes no longer running, and SentencePiece's training folders
        (a copy of the training text); return them. For the holder of the run (`hold`), before
        it writes: no other command trains in the folder then."""
        removed = []
        for leftover in self.path.glob(SPM_TRAINING_PREFIX + "????????"):  # a killed training's
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
        for folder in ("", CHECKPOINTS, LOGS):
            for path in (self.path / folder).glob(".*.tmp"):
                found = _STAGED_NAME.match(path.name)
                ours = any(fnmatch.fnmatchcase(path.name, p) for p in _WRITTEN[folder])
                if found and ours and not _running(int(found.group(1))):
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed


_STAGED_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def _running(pid: int) -> bool:
    """Whether process `pid` exists (this one included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; not a pid
        return True
    return True


def _number(text: str) -> float | None:
    """A plain decimal such as '35.75' (not 'nan' or 'inf': those rank nothing)."""
    return float(text) if text.lstrip("-").replace(".", "", 1).isdigit() else None
