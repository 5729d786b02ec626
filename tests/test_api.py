"""The Python API: `from seq2seq import Translator` translates as `seq2seq translate` does and
scores forced decodings."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import SLICE, read_gz_lines

from seq2seq import Translator
from seq2seq.cli import main
from seq2seq.inference.checkpoint import CheckpointError
from seq2seq.inference.search import BOS, EOS


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return read_gz_lines(SLICE / "test_2016_flickr.en.gz", 8)


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.load(checkpoint, device="cpu")


def cli_output(tmp_path, checkpoint, lines: list[str], *options: str) -> list[str]:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(out), *options]) == 0
    return out.read_text(encoding="utf-8").split("\n")[:-1]


def test_translate_gives_the_commands_output_with_the_saved_decoding_defaults(
    tmp_path, checkpoint, translator, sentences
):
    lines = [sentences[0], "", *sentences[1:]]
    assert translator.decode.beam == 2  # the fixture's saved defaults: beam search
    assert translator.translate(lines) == cli_output(tmp_path, checkpoint, lines)
    assert translator.translate(lines, beam=1) == cli_output(
        tmp_path, checkpoint, lines, "--beam", "1"
    )
    assert translator.translate(lines)[1] == ""


def test_one_sentence_gives_one_result_not_a_list(translator, sentences):
    assert translator.translate(sentences[0]) == translator.translate(sentences[:1])[0]


def test_nbest_gives_hypothesis_score_pairs_as_the_commands_nbest_lines(
    tmp_path, checkpoint, translator, sentences
):
    lines = [sentences[0], "", sentences[1]]
    got = translator.translate(lines, beam=3, nbest=3)
    rows = cli_output(tmp_path, checkpoint, lines, "--beam", "3", "--nbest", "3")
    expected = [[] for _ in lines]
    for row in rows:
        index, score, text = row.split(" ||| ")
        expected[int(index)].append((text, float(score)))
    assert [[t for t, _ in hyps] for hyps in got] == [[t for t, _ in e] for e in expected]
    for hyps, e in zip(got, expected, strict=True):
        assert [s for _, s in hyps] == pytest.approx([s for _, s in e], abs=1e-4)
    assert got[1] == [("", 0.0)]
    assert [s for _, s in got[0]] == sorted((s for _, s in got[0]), reverse=True)


def short_pairs(translator: Translator, n: int) -> tuple[list[str], list[str]]:
    """Test pairs that fit the tiny model's 48 positions on both sides."""
    tok, fit = translator.tokenizer, translator.max_positions
    pairs = zip(
        read_gz_lines(SLICE / "test_2016_flickr.en.gz"),
        read_gz_lines(SLICE / "test_2016_flickr.de.gz"),
        strict=True,
    )
    kept = [
        (s, t)
        for s, t in pairs
        if len(tok.encode_src([s])[0]) <= fit and len(tok.encode_tgt([t])[0]) < fit
    ][:n]
    assert len(kept) == n
    return [s for s, _ in kept], [t for _, t in kept]


def test_score_is_the_summed_log_probability_of_a_teacher_forced_pass(translator):
    sources, targets = short_pairs(translator, 6)
    got = translator.score(sources, targets)
    model, tok = translator.models[0], translator.tokenizer
    for src_line, tgt_line, value in zip(sources, targets, got, strict=True):
        src = torch.tensor([tok.encode_src([src_line])[0]])
        ids = tok.encode_tgt([tgt_line])[0]
        with torch.no_grad():
            logits = model.project(model(src, torch.tensor([[BOS, *ids]])))  # (1, T, V)
        log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
        expected = log_probs.gather(1, torch.tensor([*ids, EOS])[:, None]).sum().item()
        assert value == pytest.approx(expected, abs=1e-4)
        assert value < 0


def test_score_of_the_models_own_output_is_its_search_log_probability(translator, sentences):
    """Greedy search sums the same token log-probabilities (EOS included) that score sums."""
    cfg = translator.settings(beam=1)
    src_ids = translator.encode(sentences[:4])
    hyps = [h[0] for h in translator.translate_ids(src_ids, cfg)]
    forced = translator._forced(src_ids, [h.tokens for h in hyps]).tolist()
    assert forced == pytest.approx([h.log_prob for h in hyps], abs=1e-4)


def test_greedy_text_skips_scores_but_nbest_asks_for_them(translator, sentences):
    """Text alone is searched without scores (NaN inside); nbest pairs carry real ones."""
    plain = translator.translate(sentences[:6], beam=1)
    pairs = translator.translate(sentences[:6], beam=1, nbest=1)
    assert [p[0][0] for p in pairs] == plain
    assert all(math.isfinite(p[0][1]) and p[0][1] < 0 for p in pairs if p[0][0])
    unscored = translator.translate_ids(
        translator.encode(sentences[:6]), translator.settings(beam=1), scores=False
    )
    assert all(math.isnan(h[0].score) for h in unscored if h)


def test_a_blank_source_scores_as_translate_treats_it(translator):
    assert translator.score(["", "  "], ["", "Ein Hund."]) == [0.0, -math.inf]


def test_a_line_of_no_pieces_translates_and_scores_as_a_blank_line(translator):
    """A lone zero-width space or BOM: SentencePiece makes nothing of it, and decoded from EOS
    alone the model once invented a sentence for it."""
    lines = ["\u200b", "\ufeff", "\x01"]
    assert translator.encode(lines) == [[], [], []]
    assert translator.translate(lines, beam=1) == ["", "", ""]
    assert translator.translate(lines, beam=2, nbest=2) == [[("", 0.0)]] * 3
    assert translator.score(lines[:2], ["", "Ein Hund."]) == [0.0, -math.inf]


def test_one_string_pair_scores_as_one_pair_not_character_by_character(translator):
    """As `translate` takes one string as one line."""
    one = translator.score("A dog.", "Ein Hund.")
    assert isinstance(one, float)
    assert one == translator.score(["A dog."], ["Ein Hund."])[0]
    with pytest.raises(TypeError, match="^give the source and target both as strings or both"):
        translator.score("A dog.", ["Ein Hund."])
    with pytest.raises(TypeError, match="^give the source and target both as strings or both"):
        translator.score(["A dog."], "Ein Hund.")


@pytest.mark.parametrize("data", [b"A dog.", bytearray(b"A dog.")])
def test_bytes_are_refused_whole_not_read_as_ints(translator, data):
    """Not "line 1: expected a string, got int"."""
    with pytest.raises(TypeError, match=r"^lines must be str, not (bytes|bytearray): decode"):
        translator.translate(data)
    with pytest.raises(TypeError, match="^sources must be str"):
        translator.score(data, [])


def test_score_refuses_unequal_counts_and_over_long_targets_in_one_line(translator):
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        translator.score(["A dog.", "A cat."], ["Ein Hund."])
    with pytest.raises(ValueError, match="target 2: .* exceed the model's max_positions=48"):
        translator.score(["A dog.", "A cat."], ["Ein Hund.", "Eine Katze. " * 30])


def test_a_missing_model_is_one_clear_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="nothing-here"):
        Translator.load(tmp_path / "nothing-here")


def test_impossible_settings_are_one_clear_error(translator):
    with pytest.raises(ValueError, match="decode.nbest=3"):
        translator.translate(["A dog."], beam=2, nbest=3)


def test_a_line_that_is_no_string_is_named_by_its_position(translator):
    """Not the tokenizer's "'NoneType' object has no attribute 'strip'"."""
    with pytest.raises(TypeError, match="^line 2: expected a string, got NoneType$"):
        translator.translate(["A dog.", None])
    with pytest.raises(TypeError, match="^target 1: expected a string, got int$"):
        translator.score(["A dog."], [3])


def test_a_string_of_several_lines_is_translated_line_by_line_never_merged(translator, sentences):
    """As `seq2seq translate` reads a file: one translation per line, CRLF read as LF."""
    a, b, c = translator.translate(sentences[:3], beam=1)
    two = f"{sentences[0]}\n{sentences[1]}"
    got = translator.translate(
        [two, sentences[2], f"{sentences[0]}\r\n\r\n{sentences[1]}\r\n"], beam=1
    )
    assert got == [f"{a}\n{b}", c, f"{a}\n\n{b}\n"]
    assert translator.translate(two, beam=1) == f"{a}\n{b}"


def test_nbest_and_score_take_one_line_per_string(translator, sentences):
    with pytest.raises(ValueError, match="^line 2 holds 3 lines: give one line per string"):
        translator.translate(["A dog.", "A dog.\nA cat.\r\nA cow."], nbest=1)
    with pytest.raises(ValueError, match="^source 1 holds 2 lines"):
        translator.score(["A dog.\nA cat."], ["Ein Hund."])
    with pytest.raises(ValueError, match="^target 2 holds 2 lines"):
        translator.score(["A dog.", "A cat."], ["Ein Hund.", "Eine\nKatze."])
    # A line break at the end is a line's end, as in a file.
    once = translator.translate([sentences[0]], beam=2, nbest=2)
    assert translator.translate([sentences[0] + "\n"], beam=2, nbest=2) == once
    assert translator.score([sentences[0] + "\r\n"], ["Ein Hund.\n"]) == translator.score(
        [sentences[0]], ["Ein Hund."]
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device": "tpu"}, "device='tpu': choose from auto, cpu, cuda (or cuda:N)"),
        ({"precision": "fp8"}, "precision='fp8': choose from fp32, bf16, fp16, int8"),
    ],
)
def test_an_unknown_device_or_precision_is_one_clear_error(checkpoint, settings, message):
    """Not torch's list of every device type it knows, nor a KeyError."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Translator.load(checkpoint, **settings)


def test_a_cuda_device_by_number_where_none_is_seen_is_one_clear_error(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^--device cuda:0: no CUDA device is available$"):
        Translator.load(checkpoint, device="cuda:0")
