"""Ensembles (`seq2seq translate -m A -m B`, `Translator.load([A, B])`): the models' per-step
probabilities are averaged; an ensemble of a model with itself is that model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import SLICE, read_gz_lines, write_checkpoint

from seq2seq import Translator
from seq2seq.cli import main
from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.inference.checkpoint import read_checkpoint
from seq2seq.inference.ensemble import Ensemble
from seq2seq.inference.search import BOS
from seq2seq.nn.transformer import Transformer


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return read_gz_lines(SLICE / "test_2016_flickr.en.gz", 6)


def save_model(path: Path, cfg: ModelConfig, tokenizer_state: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    decode = DecodeConfig(beam=2, lenpen=0.6, max_len_a=1.0, max_len_b=4)
    return write_checkpoint(path, Transformer(cfg), tokenizer_state, decode)


@pytest.fixture(scope="module")
def other_shape(checkpoint, tmp_path_factory) -> Path:
    """Another random model with the checkpoint's tokenizer, but narrower and shallower."""
    extra = read_checkpoint(checkpoint)["seq2seq"]
    cfg = ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in extra["model_config"].items()}
    )
    cfg = dataclasses.replace(
        cfg, d_model=64, d_ff=128, n_heads=2, n_encoder_layers=2, n_decoder_layers=1
    )
    return save_model(tmp_path_factory.mktemp("other") / "other.ckpt", cfg, extra["tokenizer"], 1)


def cli_output(
    tmp_path, models: list[Path], lines: list[str], *options: str
) -> tuple[int, list[str]]:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = [arg for m in models for arg in ("-m", str(m))]
    code = main(["translate", *flags, "-i", str(src), "-o", str(out), *options])
    return code, out.read_text(encoding="utf-8").split("\n")[:-1] if out.exists() else []


@pytest.mark.parametrize("beam", ["1", "3"])
def test_an_ensemble_of_a_model_with_itself_translates_as_the_model(
    tmp_path, checkpoint, sentences, beam
):
    lines = [sentences[0], "", *sentences[1:]]
    code, alone = cli_output(tmp_path, [checkpoint], lines, "--beam", beam)
    assert code == 0
    code, twice = cli_output(tmp_path, [checkpoint, checkpoint], lines, "--beam", beam)
    assert code == 0 and twice == alone and twice[1] == ""


def test_an_ensemble_of_a_model_with_itself_gives_its_nbest_and_scores(checkpoint, sentences):
    alone = Translator.load(checkpoint, device="cpu")
    twice = Translator.load([checkpoint, checkpoint], device="cpu")
    assert isinstance(twice.decoder, Ensemble) and twice.decode == alone.decode
    ours = twice.translate(sentences, beam=3, nbest=3)
    theirs = alone.translate(sentences, beam=3, nbest=3)
    assert [[t for t, _ in h] for h in ours] == [[t for t, _ in h] for h in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
    sources, targets = ["A dog runs.", "Two men talk."], ["Ein Hund rennt.", "Zwei Männer."]
    assert twice.score(sources, targets) == pytest.approx(alone.score(sources, targets), abs=1e-4)


def test_the_ensemble_distribution_is_the_mean_of_the_models_probabilities(
    checkpoint, other_shape, sentences
):
    translator = Translator.load([checkpoint, other_shape], device="cpu")
    a, b = translator.models
    src = torch.tensor([translator.encode(sentences[:1])[0]])
    tgt_in = torch.tensor([[BOS, 10, 11, 12]])
    ensemble = translator.decoder
    with torch.no_grad():
        states = ensemble.decode(tgt_in, ensemble.encode(src), ensemble.new_cache())
        got = ensemble.project(states)  # (1, T, V)
        mean = (a.project(a(src, tgt_in)).softmax(-1) + b.project(b(src, tgt_in)).softmax(-1)) / 2
    torch.testing.assert_close(got.exp(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(1, 4))


def test_models_of_different_shapes_with_one_tokenizer_translate_every_line(
    tmp_path, checkpoint, other_shape, sentences
):
    lines = [sentences[0], "", *sentences[1:]]
    code, out = cli_output(tmp_path, [checkpoint, other_shape], lines, "--beam", "1")
    assert code == 0 and len(out) == len(lines) and out[1] == ""
    assert all(out[i] for i in range(len(lines)) if i != 1)
    code, out = cli_output(
        tmp_path, [checkpoint, other_shape], lines, "--beam", "3", "--nbest", "2"
    )
    indices = [int(row.split(" ||| ")[0]) for row in out]
    assert code == 0 and sorted(set(indices)) == list(range(len(lines))) and indices.count(1) == 1


def test_models_with_different_tokenizers_are_one_error_naming_both(
    tmp_path, checkpoint, joint_tokenizer, capsys
):
    cfg = ModelConfig(
        src_vocab_size=joint_tokenizer.src_vocab_size,
        tgt_vocab_size=joint_tokenizer.tgt_vocab_size,
        d_model=32,
        d_ff=64,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=1,
        max_positions=48,
    )
    stranger = save_model(tmp_path / "stranger.ckpt", cfg, joint_tokenizer.to_state(), 2)
    code, out = cli_output(tmp_path, [checkpoint, stranger], ["A dog."])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and out == []
    assert str(checkpoint) in err[-1] and str(stranger) in err[-1]
    assert "different tokenizers" in err[-1]
    with pytest.raises(ValueError, match="different tokenizers"):
        Translator.load([checkpoint, stranger])


def test_evaluate_with_two_models_scores_the_ensembles_translation(
    tmp_path, checkpoint, sentences, capsys
):
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("\n".join(sentences[:3]) + "\n", encoding="utf-8")
    ref.write_text("Ein Hund rennt.\nZwei Männer.\nEine Frau.\n", encoding="utf-8")
    reports = []
    for models in ([checkpoint], [checkpoint, checkpoint]):
        flags = [arg for m in models for arg in ("-m", str(m))]
        assert main(["evaluate", *flags, "--src", str(src), "--ref", str(ref), "--json"]) == 0
        reports.append(capsys.readouterr().out)
    assert reports[0] == reports[1] and '"bleu"' in reports[0]


def test_attention_heatmaps_with_an_ensemble_are_one_clear_error(tmp_path, checkpoint, capsys):
    code, out = cli_output(
        tmp_path, [checkpoint, checkpoint], ["A dog."], "--attention", str(tmp_path / "maps")
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and out == [] and "give a single -m" in err and "\n" not in err
