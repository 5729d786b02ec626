"""SentencePiece subwords with fixed special ids: pad 0, unk 1, bos 2, eos 3.

One model for both languages (`joint`, needed for shared embeddings) or one per side.
The model is trained once per run and saved in the run directory (`spm.model`, or
`spm.src.model` + `spm.tgt.model`); `to_state()` puts the model protos inside checkpoints
so that a checkpoint alone can translate raw text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from seq2seq.atomic import write_atomically
from seq2seq.config import TokenizerConfig
from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.data.normalization import lowercasing_rules
from seq2seq.rundir import SPM_TRAINED_ON, SPM_TRAINING_PREFIX

log = logging.getLogger(__name__)

_SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID)

#: Sentences: a plain-text file path (str or Path), a list of `Path`s, or an iterable of lines.
TextSource = str | os.PathLike | list[os.PathLike] | Iterable[str]


class Tokenizer:
    """Encode and decode sentences for the model; holds one or two SentencePiece models.

    Args:
        src: the source-side model (the only one when joint).
        tgt: the target-side model; None or `src` itself means joint.
    """

    def __init__(
        self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor | None = None
    ) -> None:
        self._src = src
        self._tgt = src if tgt is None else tgt
        for sp in {id(self._src): self._src, id(self._tgt): self._tgt}.values():
            ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise ValueError(
                    f"SentencePiece model has special ids {ids}, expected (0, 1, 2, 3)"
                )

    # ---- training and loading -------------------------------------------------------------

    @staticmethod
    def model_files(out_dir: str | os.PathLike, joint: bool) -> list[Path]:
        """Where the model file(s) of a joint or separate tokenizer live in `out_dir`."""
        names = ["spm.model"] if joint else ["spm.src.model", "spm.tgt.model"]
        return [Path(out_dir) / name for name in names]

    @classmethod
    def train(
        cls,
        src: TextSource,
        tgt: TextSource,
        cfg: TokenizerConfig,
        out_dir: str | os.PathLike,
        seed: int = 1,
        trained_on: dict | None = None,
    ) -> Tokenizer:
        """Train SentencePiece on `src`/`tgt` text, or load the model(s) already in `out_dir`.

        Lines given as iterables are streamed into a temporary text file (never held in a
        list); SentencePiece then samples `cfg.input_sentence_size` sentences from it.

        Args:
            src: source sentences, or plain-text file path(s).
            tgt: target sentences, or plain-text file path(s).
            cfg: vocabulary size, model type, coverage, sampling, normalization.
            out_dir: where `spm.model` (joint) or `spm.src.model`/`spm.tgt.model` go.
            seed: seed of SentencePiece's sentence sampling.
            trained_on: what the text is, as JSON-ready recipe keys (data.train, data.tokenizer,
                ...): written beside new models (`spm.json`); model(s) already there that were
                trained on anything else are refused, naming the first key that differs
                (models without the file, adopted from a checkpoint, are reused as they are).
        """
        out = Path(out_dir)
        files = cls.model_files(out, cfg.joint)
        trained_on = None if trained_on is None else json.loads(json.dumps(trained_on))
        if all(f.exists() for f in files):
            tok = cls.load(out)
            tok._check_matches(cfg)
            _check_trained_on(out, trained_on)
            log.info("reusing the SentencePiece model(s) in %s", out)
            return tok
        out.mkdir(parents=True, exist_ok=True)
        # The record first: a kill between the two then leaves a record without models (the
        # next run trains them, and writes its own), never models without their record.
        if trained_on is not None:
            text = json.dumps(trained_on, indent=1, sort_keys=True) + "\n"
            write_atomically(out / SPM_TRAINED_ON, text)
        if cfg.joint:
            _train_model([src, tgt], cfg, files[0], seed)
        else:
            _train_model([src], cfg, files[0], seed)
            _train_model([tgt], cfg, files[1], seed)
        return cls.load(out)

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Load the joint `spm.model`, or else `spm.src.model` + `spm.tgt.model`, from a folder."""
        joint_file = cls.model_files(model_dir, joint=True)[0]
        if joint_file.exists():
            return cls(spm.SentencePieceProcessor(model_file=str(joint_file)))
        src_file, tgt_file = cls.model_files(model_dir, joint=False)
        if not (src_file.exists() and tgt_file.exists()):
            raise FileNotFoundError(
                f"no SentencePiece model in {model_dir}: expected {joint_file.name} or {src_file.name} + {tgt_file.name}"
            )
        return cls(
            spm.SentencePieceProcessor(model_file=str(src_file)),
            spm.SentencePieceProcessor(model_file=str(tgt_file)),
        )

    def _check_matches(self, cfg: TokenizerConfig) -> None:
        sizes = {self.src_vocab_size, self.tgt_vocab_size}
        lowers = cfg.lowercase or cfg.normalization.endswith("_cf")  # SentencePiece's case folding
        if self.joint != cfg.joint or sizes != {cfg.vocab_size} or self.lowercase != lowers:
            raise ValueError(
                f"the SentencePiece model(s) on disk (joint={self.joint}, vocab {sorted(sizes)}, "
                f"lowercase={self.lowercase}) do not match data.tokenizer (joint={cfg.joint}, "
                f"vocab_size={cfg.vocab_size}, lowercase={cfg.lowercase}); delete them to retrain"
            )

    # ---- checkpoints ----------------------------------------------------------------------

    def to_state(self) -> dict[str, object]:
        """The model proto(s) as bytes and the joint flag: picklable, for checkpoints."""
        return {
            "joint": self.joint,
            "src_model": self._src.serialized_model_proto(),
            "tgt_model": None if self.joint else self._tgt.serialized_model_proto(),
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> Tokenizer:
        """Rebuild a tokenizer from `to_state()`."""
        return cls(*_processors(state))

    def __getstate__(self) -> dict[str, object]:
        return self.to_state()

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(*_processors(state))

    # ---- vocabulary -----------------------------------------------------------------------

    @property
    def joint(self) -> bool:
        """One model (and vocabulary) for both sides."""
        return self._src is self._tgt

    @property
    def lowercase(self) -> bool:
        """The models lowercase what they encode (trained with `data.tokenizer.lowercase`)."""
        return all(sp.normalize("A").endswith("a") for sp in (self._src, self._tgt))

    @property
    def src_vocab_size(self) -> int:
        """Source vocabulary size, special pieces included."""
        return self._src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        """Target vocabulary size, special pieces included."""
        return self._tgt.get_piece_size()

    # ---- encoding and decoding ------------------------------------------------------------

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        """Source ids: pieces + EOS (the encoder input needs no BOS)."""
        return self._src.encode(lines, add_eos=True)

    def encode_tgt(self, lines: list[str]) -> list[list[int]]:
        """Target ids: pieces only; `collate` adds BOS (tgt_in) and EOS (tgt_out)."""
        return self._tgt.encode(lines)

    def decode_src(self, ids: list[int]) -> str:
        """Source text from ids; stops at the first EOS and drops pad/bos."""
        return self._src.decode(_strip_specials(ids))

    def decode_tgt(self, ids: list[int]) -> str:
        """Target text from ids; stops at the first EOS and drops pad/bos."""
        return self._tgt.decode(_strip_specials(ids))

    def src_pieces(self, line: str) -> list[str]:
        """The pieces `encode_src` makes of `line`, EOS ('</s>') included: one per encoder position."""
        return self._src.encode(line, out_type=str) + [self._src.id_to_piece(EOS_ID)]

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        """One piece string per target id (specials shown as '<s>', '</s>', '<pad>')."""
        return [self._tgt.id_to_piece(i) for i in ids]


def _strip_specials(ids: list[int]) -> list[int]:
    ids = list(ids)
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return [i for i in ids if i not in _SPECIAL_IDS]


def _processors(state: dict[str, object]) -> tuple[spm.SentencePieceProcessor, ...]:
    src = spm.SentencePieceProcessor(model_proto=state["src_model"])
    if state["joint"]:
        return (src,)
    return src, spm.SentencePieceProcessor(model_proto=state["tgt_model"])


def _file_paths(source: TextSource) -> list[str] | None:
    """The file path(s) `source` names, or None when it is an iterable of lines."""
    if isinstance(source, str | os.PathLike):
        return [str(source)]
    if (
        isinstance(source, list | tuple)
        and source
        and all(isinstance(s, os.PathLike) for s in source)
    ):
        return [str(s) for s in source]
    return None


def _train_model(
    sources: list[TextSource], cfg: TokenizerConfig, model_file: Path, seed: int
) -> None:
    """Train one SentencePiece model from `sources` and write it atomically to `model_file`."""
    out_dir = model_file.parent
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=SPM_TRAINING_PREFIX) as tmp:
        inputs: list[str] = []
        text_file = Path(tmp) / "input.txt"
        with text_file.open("w", encoding="utf-8") as f:
            wrote_lines = False
            for source in sources:
                if (paths := _file_paths(source)) is not None:
                    inputs.extend(paths)
                else:
                    for line in source:
                        f.write(line.replace("\n", " ") + "\n")
                        wrote_lines = True
        if wrote_lines:
            inputs.append(str(text_file))
        rules = {"normalization_rule_name": cfg.normalization}
        if cfg.lowercase:
            rules_file = Path(tmp) / "rules.tsv"
            rules_file.write_text(lowercasing_rules(cfg.normalization), encoding="utf-8")
            rules = {"normalization_rule_tsv": str(rules_file)}
        spm.set_random_generator_seed(seed)
        prefix = Path(tmp) / "spm"
        try:
            spm.SentencePieceTrainer.train(
                input=inputs,
                model_prefix=str(prefix),
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                input_sentence_size=cfg.input_sentence_size,
                shuffle_input_sentence=True,
                **rules,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            if most := re.search(r"Vocabulary size too high \(\d+\).*<= (\d+)", msg):
                raise ValueError(
                    f"data.tokenizer.vocab_size={cfg.vocab_size}: the training text gives "
                    f"SentencePiece at most {most.group(1)} pieces for {model_file.name}; "
                    "lower it"
                ) from None
            raise ValueError(
                f"SentencePiece training for {model_file.name} failed: {msg}"
            ) from None
        # Rename last: a crash never leaves a half-written model that a later run would reuse.
        os.replace(prefix.with_suffix(".vocab"), model_file.with_suffix(".vocab"))
        os.replace(prefix.with_suffix(".model"), model_file)
    log.info("trained %s (%s, vocab %d)", model_file, cfg.model_type, cfg.vocab_size)


def _check_trained_on(out: Path, trained_on: dict | None) -> None:
    """Refuse model(s) in `out` whose `spm.json` says they were trained on other data or
    settings than `trained_on` (a `prepare` of one corpus, then a `train` of another)."""
    path = out / SPM_TRAINED_ON
    if trained_on is None or not path.is_file():
        return
    before = json.loads(path.read_text())
    key = _first_difference(before, trained_on, "data")
    if key is not None:
        raise ValueError(
            f"{out}: its SentencePiece model was trained with another {key} ({path}); use "
            "another --run-dir (or start this run afresh: seq2seq train --overwrite)"
        )


def _first_difference(a: object, b: object, key: str) -> str | None:
    """The dotted key of the first place where `a` and `b` differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(set(a) | set(b)):
            found = _first_difference(a.get(name), b.get(name), f"{key}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (found := _first_difference(x, y, f"{key}[{i}]")) is not None:
                return found
        return None
    return None if a == b else key
