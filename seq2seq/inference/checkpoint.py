"""Loading a trained model for inference (no Lightning import).

Every checkpoint is self-contained: besides Lightning's state it carries, under the key
"seq2seq", the model config, the tokenizer (serialized SentencePiece models), the decoding
defaults and the resolved recipe, so a checkpoint alone translates raw text. Where a run
directory keeps its checkpoints is `seq2seq.rundir`'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.nn.transformer import Transformer
from seq2seq.rundir import RunDir

KEY = "seq2seq"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line naming the file and the problem."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would run code when unpickled: refused, never loaded."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file stays itself. A run directory gives averaged.ckpt if the recipe
    averaged checkpoints, else its best checkpoint by validation BLEU, else last.ckpt."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    run = RunDir(path)
    for candidate in [run.averaged, *run.ranked(), run.last]:
        if candidate.is_file():
            return candidate
    if (path / "config.json").is_file() and not (path / "recipe.yaml").exists():
        raise CheckpointError(
            f"{path}: an exported model (config.json; Transformers or CTranslate2 load it), not "
            "a seq2seq run directory or checkpoint: give the run it was exported from"
        )
    raise CheckpointError(f"{path}: run directory has no checkpoints in {run.checkpoints}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A seq2seq checkpoint, loaded without running code: `torch.load(weights_only=True)`,
    whose unpickler builds only tensors and plain containers. Our checkpoints need nothing
    more (tested); a file that asks for any other global (a pickle payload, someone else's
    classes) is refused with one line naming the file and what it asked for. Missing,
    truncated and foreign files get one line too."""
    path = Path(path)
    try:
        ckpt = _load(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it would run code outside tensors and plain data "
                f"(it asks for {', '.join(unsafe[:3])}); seq2seq never writes such a file"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_why(path, err)})") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_why(path, err)})") from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a seq2seq checkpoint (no '{KEY}' section)")
    return ckpt


def _load(path: Path) -> object:
    """torch.load, weights only, memory-mapped where the file allows it (torch's zip format):
    then only the tensors used are read, not a training checkpoint's optimizer state beside
    the weights (0.21-0.25 s -> 0.12 s for the default recipe's). Files in torch's legacy
    format, and files that are no zip at all (truncated, foreign), are read as before."""
    mmap = zipfile.is_zipfile(path)
    with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _why(path: Path, err: Exception) -> str:
    """What is wrong with a file torch.load failed on, in a user's words where they can be
    told: empty; a zip archive without its end, or a pickle that ends early (a copy or save
    cut short); neither of torch's formats (its zip archive, or before torch 1.6 a pickle);
    else torch's own error."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return f"{type(err).__name__}: {_first_line(err)}"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "truncated: torch's zip format without its end"
    if not head.startswith(b"PK") and head[0] != 0x80:
        return "not a torch checkpoint: neither torch's zip format nor a pickle"
    if isinstance(err, EOFError) or "truncated" in str(err):
        return "truncated: the file ends early"
    if isinstance(err, pickle.UnpicklingError):
        return _first_line(err)
    return f"{type(err).__name__}: {_first_line(err)}"


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a checkpoint asks for beyond the weights-only set (read, never imported):
    torch lists them for its zip format; a bare pickle (torch's format before 1.6, or
    `pickle.dump`) is read opcode by opcode, and what it asks for outside torch's own
    rebuilding functions and plain containers is named."""
    if zipfile.is_zipfile(path):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a zip torch cannot list
            return []
    return [name for name in _pickle_globals(path) if name.split(".")[0] not in PLAIN_MODULES]


#: Modules whose globals torch's own pickles (legacy format) ask for: its rebuilding
#: functions and storages, OrderedDict, and the codec that pickles bytes.
PLAIN_MODULES = frozenset({"torch", "collections", "_codecs"})

#: Opcodes that push a string a later STACK_GLOBAL may take as a module or name.
_STRINGS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
     "BINSTRING", "STRING"}
)  # fmt: skip


def _pickle_globals(path: Path, pickles: int = 5) -> list[str]:
    """The 'module.name' globals that the first `pickles` pickles of a file refer to, read
    by pickletools without running anything (torch's legacy format is several pickles in a
    row). STACK_GLOBAL takes the last two values pushed, strings or memo reads of them."""
    names: list[str] = []
    with contextlib.suppress(Exception), path.open("rb") as f:
        for _ in range(pickles):
            pushed: list[str | None] = []
            memo: dict[int, str | None] = {}
            for op, arg, _ in pickletools.genops(f):
                if op.name in _STRINGS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name == "GLOBAL":
                    names.append(".".join(arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and pushed[-2] and pushed[-1]:
                        names.append(f"{pushed[-2]}.{pushed[-1]}")
                    pushed.append(None)
                else:
                    pushed.append(None)
    return list(dict.fromkeys(names))


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's first line (torch's run on for several)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(". ")[0].rstrip(".")


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
    tokenizer: object  # seq2seq.data.tokenizer.Tokenizer (imported lazily: keeps start-up fast)
    decode: DecodeConfig
    path: Path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run directory's chosen checkpoint (see `resolve_checkpoint`) or a checkpoint file."""
    from seq2seq.data.tokenizer import Tokenizer

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
    with skipped_init():
        model = Transformer(cfg)
    try:
        assign_weights(model, model_weights(ckpt))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{file}: weights do not fit the model config ({first})") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, decode, file)


def assign_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Make `weights` the model's parameters without copying them (`load_state_dict(...,
    assign=True)`, strict), keeping tied parameters one Parameter: assignment would give each
    name its own. The tensors of a memory-mapped checkpoint stay mapped, read on first use."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    model.load_state_dict(weights, assign=True)
    for first, *others in names.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))


#: torch.nn.init's in-place initializers, the ones layers call from their constructors.
_INITIALIZERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Layers built inside keep their uninitialized memory: for a model whose weights are
    loaded at once, strictly, the random draws are wasted start-up (a fifth of a second for
    the default recipe's model). Like transformers' `no_init_weights`; restored on exit."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    try:
        for name in _INITIALIZERS:
            setattr(torch.nn.init, name, _unchanged)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _unchanged(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
