"""Run-directory layout and loading a trained model for inference (no Lightning import).

A run directory holds:
    recipe.yaml                 the resolved recipe
    tokenizer/                  the SentencePiece model(s)
    checkpoints/stepNNNNNNN-bleuXX.XX.ckpt   best k by validation BLEU
    checkpoints/last.ckpt       the latest state (resume point)
    checkpoints/averaged.ckpt   average of the last N kept checkpoints (if the recipe asks)
    logs/                       TensorBoard and CSV logs
    curves.png, results.json

Every checkpoint is self-contained: besides Lightning's state it carries, under the key
"seq2seq", the model config, the tokenizer (serialized SentencePiece models), the decoding
defaults and the resolved recipe, so a checkpoint alone translates raw text.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.model import Transformer

KEY = "seq2seq"
#: A run directory's lock file, held while its data is prepared (`TranslationDataModule`).
PREPARE_LOCK = ".prepare.lock"
FORMAT_VERSION = 1
#: Best-k checkpoint files, as train.py's ModelCheckpoint names them:
#: step{step:07d}-bleu{val_bleu:.2f}.ckpt
_KEPT = re.compile(r"^step(\d+)-bleu(.*)\.ckpt$")
#: The last-N checkpoints (trainer.keep_last), whatever their BLEU: recent-step{step:07d}.ckpt
_RECENT = re.compile(r"^recent-step(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line naming the file and the problem."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    path = checkpoint_dir(run_dir) / "last.ckpt"
    return path if path.is_file() else None


def kept_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, float | None, Path]]:
    """(step, validation BLEU, path) of every best-k checkpoint file of a run; BLEU is None
    when the name carries no number."""
    found = []
    for path in checkpoint_dir(run_dir).glob("step*-bleu*.ckpt"):
        match = _KEPT.match(path.name)
        if match:
            found.append((int(match.group(1)), _number(match.group(2)), path))
    return found


def _number(text: str) -> float | None:
    """A plain decimal such as '35.75' (not 'nan' or 'inf': those rank nothing)."""
    return float(text) if text.lstrip("-").replace(".", "", 1).isdigit() else None


def ranked_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Best-k checkpoints, best validation BLEU first (ties: later step first)."""
    scored = [(bleu, step, p) for step, bleu, p in kept_checkpoints(run_dir) if bleu is not None]
    return [p for _, _, p in sorted(scored, reverse=True)]


def checkpoints_by_step(run_dir: str | os.PathLike) -> list[Path]:
    """The kept best-k checkpoints of a run, oldest step first."""
    return [p for _, _, p in sorted(kept_checkpoints(run_dir), key=lambda kept: kept[0])]


def recent_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of the last validations (trainer.keep_last), oldest step first."""
    found = []
    for path in checkpoint_dir(run_dir).glob("recent-step*.ckpt"):
        match = _RECENT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file stays itself. A run directory gives averaged.ckpt if the recipe
    averaged checkpoints, else its best checkpoint by validation BLEU, else last.ckpt."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    averaged = checkpoint_dir(path) / "averaged.ckpt"
    candidates = [averaged] if averaged.is_file() else []
    candidates += ranked_checkpoints(path) + [checkpoint_dir(path) / "last.ckpt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: run directory has no checkpoints in {checkpoint_dir(path)}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with one-line errors for missing, truncated or foreign files."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a seq2seq checkpoint (no '{KEY}' section)")
    return ckpt


def inference_state(
    cfg: ModelConfig, tokenizer_state: dict, decode: DecodeConfig, recipe: dict
) -> dict:
    """What a checkpoint carries besides weights (stored under checkpoint['seq2seq'])."""
    return {
        "format": FORMAT_VERSION,
        "model_config": dataclasses.asdict(cfg),
        "tokenizer": tokenizer_state,
        "decode": dataclasses.asdict(decode),
        "recipe": recipe,
    }


def model_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The Transformer's own state dict out of a Lightning checkpoint ('model.' prefix)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


@dataclass
class LoadedModel:
    """Everything needed to translate raw text."""

    model: Transformer
    tokenizer: object  # seq2seq.tokenizer.Tokenizer (imported lazily: keeps start-up fast)
    decode: DecodeConfig
    path: Path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run directory's chosen checkpoint (see `resolve_checkpoint`) or a checkpoint file."""
    from seq2seq.tokenizer import Tokenizer

    file = resolve_checkpoint(path)
    ckpt = read_checkpoint(file)
    extra = ckpt[KEY]
    try:
        cfg = ModelConfig(**_tuples(extra["model_config"]))
        decode = DecodeConfig(**extra["decode"])
    except (TypeError, ValueError) as err:  # unknown keys, or values this version refuses
        raise CheckpointError(f"{file}: {err}") from None
    tokenizer = Tokenizer.from_state(extra["tokenizer"])
    if (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) != (
        cfg.src_vocab_size,
        cfg.tgt_vocab_size,
    ):
        raise CheckpointError(
            f"{file}: tokenizer vocabulary ({tokenizer.src_vocab_size}, {tokenizer.tgt_vocab_size}) "
            f"does not match the model's ({cfg.src_vocab_size}, {cfg.tgt_vocab_size})"
        )
    model = Transformer(cfg)
    try:
        model.load_state_dict(model_weights(ckpt))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{file}: weights do not fit the model config ({first})") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, decode, file)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
