"""SentencePiece wrapper: fixed ids, exact round trips, reuse, checkpoint state."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from seq2seq.config import TokenizerConfig
from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.data.tokenizer import Tokenizer


def _never_read():
    raise AssertionError("training data was read although the model exists")
    yield  # pragma: no cover


def test_special_ids_are_pad0_unk1_bos2_eos3(joint_tokenizer: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert joint_tokenizer.tgt_pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_source_ids_end_with_eos_and_target_ids_have_no_bos_or_eos(
    joint_tokenizer, slice_lines
) -> None:
    src = joint_tokenizer.encode_src(slice_lines[0][:50])
    tgt = joint_tokenizer.encode_tgt(slice_lines[1][:50])
    assert all(ids[-1] == EOS_ID and EOS_ID not in ids[:-1] and BOS_ID not in ids for ids in src)
    assert all(EOS_ID not in ids and BOS_ID not in ids and PAD_ID not in ids for ids in tgt)


@pytest.mark.parametrize("normalization", ["identity", "nmt_nfkc"])
def test_joint_unigram_round_trips_its_training_lines_exactly(
    slice_lines, tmp_path: Path, normalization: str
) -> None:
    # Multi30k is NFKC-stable, so both rules give back the line; SentencePiece always
    # collapses runs of spaces (a few lines have double spaces), hence the split/join.
    en, de = slice_lines
    cfg = TokenizerConfig(vocab_size=1000, character_coverage=1.0, normalization=normalization)
    tok = Tokenizer.train(iter(en), iter(de), cfg, tmp_path)
    for lines, encode, decode in (
        (en, tok.encode_src, tok.decode_src),
        (de, tok.encode_tgt, tok.decode_tgt),
    ):
        assert [decode(ids) for ids in encode(lines)] == [" ".join(line.split()) for line in lines]


def test_separate_bpe_models_are_written_per_side(slice_lines, tmp_path: Path) -> None:
    cfg = TokenizerConfig(joint=False, model_type="bpe", vocab_size=600)
    tok = Tokenizer.train(iter(slice_lines[0]), iter(slice_lines[1]), cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.model")) == ["spm.src.model", "spm.tgt.model"]
    assert not tok.joint and tok.src_vocab_size == tok.tgt_vocab_size == 600
    assert tok.decode_tgt(tok.encode_tgt([slice_lines[1][0]])[0]) == " ".join(
        slice_lines[1][0].split()
    )


def test_trains_from_plain_text_files(slice_lines, tmp_path: Path) -> None:
    (tmp_path / "en.txt").write_text("\n".join(slice_lines[0]) + "\n", encoding="utf-8")
    (tmp_path / "de.txt").write_text("\n".join(slice_lines[1]) + "\n", encoding="utf-8")
    tok = Tokenizer.train(
        str(tmp_path / "en.txt"),
        tmp_path / "de.txt",
        TokenizerConfig(vocab_size=800),
        tmp_path / "spm",
    )
    assert tok.joint and tok.src_vocab_size == 800


def test_existing_model_is_loaded_instead_of_retrained(
    joint_tokenizer, slice_lines, tmp_path: Path
) -> None:
    cfg = TokenizerConfig(vocab_size=1000)
    first = Tokenizer.train(iter(slice_lines[0][:500]), iter(slice_lines[1][:500]), cfg, tmp_path)
    stamp = (tmp_path / "spm.model").stat().st_mtime_ns
    again = Tokenizer.train(_never_read(), _never_read(), cfg, tmp_path)
    assert (tmp_path / "spm.model").stat().st_mtime_ns == stamp
    assert again.to_state() == first.to_state()


def test_existing_model_with_another_vocab_size_is_refused(slice_lines, tmp_path: Path) -> None:
    Tokenizer.train(
        iter(slice_lines[0][:500]),
        iter(slice_lines[1][:500]),
        TokenizerConfig(vocab_size=500),
        tmp_path,
    )
    with pytest.raises(ValueError, match="do not match"):
        Tokenizer.train(_never_read(), _never_read(), TokenizerConfig(vocab_size=1000), tmp_path)


def test_a_vocabulary_larger_than_the_text_allows_names_the_key_and_the_most(
    tmp_path: Path,
) -> None:
    """SentencePiece's "Vocabulary size too high (8000). Please set it to a value <= N"
    becomes a line naming the recipe key to lower."""
    lines = ["a dog runs", "two men talk", "a child plays"] * 20
    with pytest.raises(
        ValueError, match=r"^data.tokenizer.vocab_size=8000: .* at most \d+ pieces .* lower it$"
    ):
        Tokenizer.train(iter(lines), iter(lines), TokenizerConfig(vocab_size=8000), tmp_path)
    assert not (tmp_path / "spm.model").exists()


def test_state_round_trips_without_files(joint_tokenizer, slice_lines) -> None:
    state = joint_tokenizer.to_state()
    assert isinstance(state["src_model"], bytes) and state["joint"] is True
    for restored in (Tokenizer.from_state(state), pickle.loads(pickle.dumps(joint_tokenizer))):
        assert restored.joint and restored.src_vocab_size == joint_tokenizer.src_vocab_size
        assert restored.encode_src(slice_lines[0][:20]) == joint_tokenizer.encode_src(
            slice_lines[0][:20]
        )


def test_decode_stops_at_eos_and_drops_pad_and_bos(joint_tokenizer) -> None:
    ids = joint_tokenizer.encode_tgt(["Ein Hund läuft."])[0]
    assert joint_tokenizer.decode_tgt([BOS_ID, *ids, EOS_ID, *ids, PAD_ID]) == "Ein Hund läuft."
    assert (
        joint_tokenizer.decode_src(joint_tokenizer.encode_src(["A dog runs."])[0]) == "A dog runs."
    )


def test_source_pieces_match_encoder_positions(joint_tokenizer, slice_lines) -> None:
    line = slice_lines[0][3]
    pieces = joint_tokenizer.src_pieces(line)
    assert len(pieces) == len(joint_tokenizer.encode_src([line])[0]) and pieces[-1] == "</s>"
    assert "".join(pieces[:-1]).replace("\u2581", " ").strip() == " ".join(line.split())


@pytest.fixture(scope="module")
def lowercasing_tokenizer(slice_lines, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=1000, lowercase=True)
    out = tmp_path_factory.mktemp("lowercasing-spm")
    return Tokenizer.train(iter(slice_lines[0]), iter(slice_lines[1]), cfg, out)


def test_lowercase_model_normalizes_as_nmt_nfkc_then_str_lower(
    lowercasing_tokenizer, slice_lines
) -> None:
    import sentencepiece as spm

    builtin = spm.SentencePieceNormalizer(rule_name="nmt_nfkc")
    tricky = [
        "Zwei weiße Männer auf der STRASSE und der Straße.",  # ß stays ß (no case folding)
        "ÀÉÎÕÜ Ǆ ǅ İstanbul",  # accented capitals, digraphs, dotted I (two code points)
        "Ｆｕｌｌｗｉｄｔｈ ﬁ ½ Ⅻ",  # compatibility characters: NFKC first, then lowercase
        "A\u0301 O\u0308\tTab\u00a0NBSP",  # decomposed accents, a tab, a no-break space
        "ΑΘΗΝΑ Straße",
    ]
    lines = slice_lines[0][:300] + slice_lines[1][:300] + tricky
    sp = lowercasing_tokenizer._src
    assert [sp.normalize(line) for line in lines] == [
        line.lower() for line in builtin.normalize(lines)
    ]


def test_lowercase_model_reads_any_case_and_writes_lowercase(
    lowercasing_tokenizer, joint_tokenizer
) -> None:
    tok = lowercasing_tokenizer
    assert tok.lowercase and not joint_tokenizer.lowercase
    line = "Zwei weiße Männer gehen die Straße entlang."
    assert (
        tok.encode_src([line])
        == tok.encode_src([line.upper().replace("SS", "ß")])
        == (tok.encode_src([line.lower()]))
    )
    assert tok.decode_tgt(tok.encode_tgt([line])[0]) == line.lower()
    pieces = [tok.tgt_pieces([i])[0] for i in range(4, tok.tgt_vocab_size)]
    assert all(piece == piece.lower() for piece in pieces)


def test_lowercasing_travels_in_the_checkpoint_state(lowercasing_tokenizer) -> None:
    restored = Tokenizer.from_state(lowercasing_tokenizer.to_state())
    assert restored.lowercase
    assert restored.encode_src(["Ein HUND."]) == lowercasing_tokenizer.encode_src(["ein hund."])


def test_existing_model_that_does_not_lowercase_is_refused_for_lowercase(
    slice_lines, tmp_path: Path
) -> None:
    lines = slice_lines[0][:500], slice_lines[1][:500]
    Tokenizer.train(iter(lines[0]), iter(lines[1]), TokenizerConfig(vocab_size=500), tmp_path)
    with pytest.raises(ValueError, match=r"lowercase=False\) do not match .*lowercase=True"):
        Tokenizer.train(
            _never_read(), _never_read(), TokenizerConfig(vocab_size=500, lowercase=True), tmp_path
        )


def test_a_case_folding_model_on_disk_is_reused_for_its_own_recipe(slice_lines, tmp_path) -> None:
    cfg = TokenizerConfig(vocab_size=500, normalization="nmt_nfkc_cf")
    lines = slice_lines[0][:500], slice_lines[1][:500]
    first = Tokenizer.train(iter(lines[0]), iter(lines[1]), cfg, tmp_path)
    assert first.lowercase  # SentencePiece's case folding lowercases too
    assert Tokenizer.train(_never_read(), _never_read(), cfg, tmp_path).to_state() == (
        first.to_state()
    )


def test_a_training_killed_midway_leaves_its_record_not_unrecorded_models(
    slice_lines, tmp_path, monkeypatch
) -> None:
    """The record of what the models are trained on is written before them: a kill in between
    leaves a record and no models (the next run trains and records its own), never models
    that a run with other data would take without a word."""
    import seq2seq.data.tokenizer as tokenizer_module

    cfg = TokenizerConfig(vocab_size=300)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_module, "_train_model", killed)
        with pytest.raises(KeyboardInterrupt):
            Tokenizer.train(
                iter(slice_lines[0]), iter(slice_lines[1]), cfg, tmp_path, trained_on={"a": 1}
            )
    assert (tmp_path / "spm.json").exists() and not (tmp_path / "spm.model").exists()
    Tokenizer.train(iter(slice_lines[0]), iter(slice_lines[1]), cfg, tmp_path, trained_on={"b": 2})
    assert json.loads((tmp_path / "spm.json").read_text()) == {"b": 2}
