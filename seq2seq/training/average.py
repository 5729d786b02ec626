"""`seq2seq average`: one checkpoint whose parameters are the mean of several checkpoints'.

The mean is taken in float64, in the order given, and cast back to each tensor's dtype, so it
is deterministic; integer tensors are taken from the first checkpoint. The result keeps the
first checkpoint's "seq2seq" section (model config, tokenizer, decoding defaults) and drops
optimizer and trainer state: it translates, it does not resume.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from seq2seq.atomic import atomic_file
from seq2seq.config import DROPOUT_KEYS
from seq2seq.inference.checkpoint import KEY, CheckpointError, read_checkpoint
from seq2seq.rundir import RunDir

log = logging.getLogger(__name__)


def last_checkpoints(run_dir: str | os.PathLike, n: int | None) -> list[Path]:
    """The last n checkpoints by step (all of them when n is None): of the last validations'
    (recent-step*.ckpt, trainer.keep_last) when the run kept them, else of the best k."""
    if n is not None and n < 1:  # paths[-0:] would be all of them
        raise ValueError(f"--last {n}: average at least 1 checkpoint")
    run = RunDir(run_dir)
    paths = run.recent() or run.best_by_step()
    if not paths:
        raise CheckpointError(
            f"{run_dir}: no recent-step*.ckpt or step*-bleu*.ckpt in {run.checkpoints}"
        )
    if n is not None and len(paths) < n:
        log.warning("%s: only %d checkpoints to average, not %d", run_dir, len(paths), n)
    return paths if n is None else paths[-n:]


def _check_same_shape(state: dict[str, Tensor], first: dict[str, Tensor], path: Path) -> None:
    if state.keys() != first.keys():
        diff = sorted(set(state) ^ set(first))
        raise CheckpointError(f"{path}: parameters differ from the first checkpoint's ({diff[0]})")
    for name, tensor in state.items():
        if tensor.shape != first[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, "
                f"the first checkpoint's has {tuple(first[name].shape)}"
            )


def _shared_names(state: dict[str, Tensor]) -> dict[str, str]:
    """Each name -> the first name holding the very same tensor (tied embeddings)."""
    first_of: dict[tuple, str] = {}
    return {
        name: first_of.setdefault((t.data_ptr(), t.shape, t.stride(), t.dtype), name)
        for name, t in state.items()
    }


def _check_same_model(extra: dict, first: dict, path: Path, first_path: Path) -> None:
    """Refuse a checkpoint of another vocabulary or architecture than the first's: the same
    shapes do not make the same model (two SentencePiece models of one size, post-norm and
    pre-norm). Dropout rates may differ: they are not in the weights."""
    if extra.get("tokenizer") != first.get("tokenizer"):
        raise CheckpointError(
            f"{path}: its tokenizer differs from {first_path}'s; models of different "
            "vocabularies cannot be averaged"
        )
    mine, theirs = extra.get("model_config", {}), first.get("model_config", {})
    for key in sorted(set(mine) | set(theirs)):
        if key not in DROPOUT_KEYS and mine.get(key) != theirs.get(key):
            raise CheckpointError(
                f"{path}: model.{key}={mine.get(key)!r}, {first_path} has {theirs.get(key)!r}; "
                "only checkpoints of one model can be averaged"
            )


def average_state_dicts(paths: list[Path]) -> tuple[dict[str, Tensor], dict]:
    """The mean state_dict of the checkpoints at `paths`, and the first one's "seq2seq" section."""
    if not paths:
        raise ValueError("no checkpoints to average")
    first_ckpt = read_checkpoint(paths[0])
    first = first_ckpt["state_dict"]
    shared = _shared_names(first)
    total = {k: v.double() for k, v in first.items() if v.is_floating_point() and shared[k] == k}
    for path in paths[1:]:
        ckpt = read_checkpoint(path)
        state = ckpt["state_dict"]
        _check_same_shape(state, first, path)
        _check_same_model(ckpt[KEY], first_ckpt[KEY], path, paths[0])
        for name in total:
            total[name] += state[name].double()
    mean = {name: (t / len(paths)).to(first[name].dtype) for name, t in total.items()}
    averaged = {k: mean.get(shared[k], v) for k, v in first.items()}
    return averaged, first_ckpt[KEY]


def average_checkpoints(paths: list[Path], output: Path) -> Path:
    """Write the average of `paths` to `output` (a .ckpt that `seq2seq translate` loads).

    The file is written to a temporary name first, then renamed: never left half-written
    (seq2seq.atomic).
    """
    output = Path(output)
    _check_replaceable(output)
    state, extra = average_state_dicts([Path(p) for p in paths])
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output, "wb") as f:
        torch.save({"state_dict": state, KEY: extra, "averaged_from": [str(p) for p in paths]}, f)
    log.info("averaged %d checkpoints into %s", len(paths), output)
    return output


def _check_replaceable(output: Path) -> None:
    """An existing file is replaced only where it is an average written here before; any
    other file there (a user's, a training checkpoint) is refused, naming it."""
    if not output.is_file():  # a new name, or a device or pipe, written into
        return
    try:
        replaceable = "averaged_from" in read_checkpoint(output)
    except CheckpointError:
        replaceable = False
    if not replaceable:
        raise ValueError(
            f"{output}: exists and is not an averaged checkpoint; give another -o or move it away"
        )


def average_cli(args: argparse.Namespace) -> int:
    """The `seq2seq average` command (arguments: seq2seq.cli.decode.add_average)."""
    if bool(args.run_dir) == bool(args.checkpoints):
        raise ValueError("give either checkpoint files or --run-dir (with --last N)")
    if args.last is not None and not args.run_dir:
        raise ValueError("--last N picks from --run-dir; checkpoint files are averaged as given")
    if args.run_dir:
        paths = last_checkpoints(args.run_dir, args.last)
        output = args.output or RunDir(args.run_dir).averaged
    else:
        if args.output is None:
            raise ValueError("-o/--output is required when averaging checkpoint files")
        paths, output = [Path(p) for p in args.checkpoints], args.output
    for path in paths:
        if Path(path).resolve() == Path(output).resolve():
            raise ValueError(f"{output}: the output would overwrite one of the inputs")
    print(average_checkpoints(paths, Path(output)))
    return 0
