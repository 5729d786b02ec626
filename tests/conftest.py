"""Shared fixtures: small slices of Multi30k, a tokenizer trained on them, and packing as on
an accelerator."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

# The hub is unreachable here: `datasets` must never try it (set before `datasets` is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seq2seq.config import DecodeConfig, TokenizerConfig, preset  # noqa: E402
from seq2seq.data.tokenizer import Tokenizer  # noqa: E402
from seq2seq.inference.checkpoint import inference_state  # noqa: E402
from seq2seq.nn.transformer import Transformer  # noqa: E402

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
if not MULTI30K.is_dir():
    MULTI30K = Path("/work/shared/data/multi30k")


def read_gz_lines(path: Path, n: int | None = None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[:n] if n is not None else lines


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The shared, read-only Multi30k folder (never write into it)."""
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    return MULTI30K


#: The slice shipped with the tests: the first 2,000 / 200 / 200 pairs (see tests/data/README.md).
SLICE = Path(__file__).resolve().parent / "data" / "multi30k"


@pytest.fixture(scope="session")
def multi30k_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shipped slice: the first 2000 train pairs and 200 val/test pairs
    (en, de), gzipped. Needs nothing outside the repository."""
    out = tmp_path_factory.mktemp("multi30k-slice")
    for path in SLICE.glob("*.gz"):
        shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def slice_lines(multi30k_slice: Path) -> tuple[list[str], list[str]]:
    """The 2000 (en, de) training lines of the slice."""
    return (
        read_gz_lines(multi30k_slice / "train.en.gz"),
        read_gz_lines(multi30k_slice / "train.de.gz"),
    )


@pytest.fixture(scope="session")
def joint_tokenizer(slice_lines, tmp_path_factory: pytest.TempPathFactory):
    """A joint unigram model (vocab 1000, coverage 1.0) trained on the slice."""
    from seq2seq.config import TokenizerConfig
    from seq2seq.data.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("joint-spm")
    return Tokenizer.train(
        iter(slice_lines[0]), iter(slice_lines[1]), TokenizerConfig(vocab_size=1000), out
    )


@pytest.fixture
def accelerator_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Packing.of` as on an accelerator, simulated on the CPU: it packs from a batch's
    host-made positions only, never finding the real tokens itself (nonzero reads the device)."""
    from seq2seq.layout import Packing

    find_or_take = Packing.of

    def host_positions_only(cls, real, index=None):
        return None if index is None else find_or_take(real, index)

    monkeypatch.setattr(Packing, "of", classmethod(host_positions_only))


#: The tiny checkpoint's position table: short, so over-long lines are easy to make.
MAX_POSITIONS = 48


def write_checkpoint(
    path: Path, model: Transformer, tokenizer_state: dict, decode: DecodeConfig
) -> Path:
    """`model` saved as a checkpoint that translates: its weights under `model.` and the
    inference state (shape, tokenizer, decoding defaults) that `seq2seq train` writes."""
    weights = {"model." + k: v for k, v in model.state_dict().items()}
    state = inference_state(model.cfg, tokenizer_state, decode, {})
    torch.save({"state_dict": weights, "seq2seq": state}, path)
    return path


@pytest.fixture(scope="session")
def checkpoint(multi30k_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Transformer with a SentencePiece model trained on 300 Multi30k pairs."""
    out = tmp_path_factory.mktemp("tiny-model")
    en = read_gz_lines(multi30k_slice / "train.en.gz", 300)
    de = read_gz_lines(multi30k_slice / "train.de.gz", 300)
    tok = Tokenizer.train(en, de, TokenizerConfig(vocab_size=250), out / "tokenizer")
    cfg = preset(
        "tiny",
        src_vocab_size=tok.src_vocab_size,
        tgt_vocab_size=tok.tgt_vocab_size,
        max_positions=MAX_POSITIONS,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    decode = DecodeConfig(beam=2, lenpen=0.6, max_len_a=1.0, max_len_b=4)
    return write_checkpoint(out / "tiny.ckpt", model, tok.to_state(), decode)
