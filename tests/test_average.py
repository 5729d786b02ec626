"""`seq2seq average`: the mean of checkpoints, deterministic, and a checkpoint that loads."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from seq2seq.cli import main
from seq2seq.config import DecodeConfig, preset
from seq2seq.inference.checkpoint import (
    CheckpointError,
    inference_state,
    model_weights,
    read_checkpoint,
)
from seq2seq.nn.transformer import Transformer
from seq2seq.rundir import RunDir
from seq2seq.training.average import average_checkpoints

CFG = preset("tiny", src_vocab_size=40, tgt_vocab_size=40)


def save_checkpoint(path: Path, seed: int, cfg=CFG, tokenizer: str = "spm") -> Path:
    """A Lightning-like checkpoint: weights, the seq2seq section (its decoding defaults
    differ by seed) and optimizer state."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
            "seq2seq": inference_state(cfg, {"model": tokenizer}, DecodeConfig(beam=seed + 1), {}),
            "optimizer_states": [{"state": {0: torch.ones(3)}}],
            "global_step": 100 * seed,
        },
        path,
    )
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return model_weights(read_checkpoint(path))


def test_the_average_of_two_copies_equals_the_checkpoint(tmp_path):
    first = save_checkpoint(tmp_path / "a.ckpt", seed=1)
    copy = shutil.copy(first, tmp_path / "b.ckpt")
    out = average_checkpoints([first, Path(copy)], tmp_path / "avg.ckpt")
    original, averaged = weights(first), weights(out)
    assert original.keys() == averaged.keys()
    assert all(torch.equal(original[k], averaged[k]) for k in original)


def test_the_average_is_the_elementwise_mean_and_keeps_the_first_seq2seq_section(tmp_path):
    paths = [save_checkpoint(tmp_path / f"{s}.ckpt", seed=s) for s in (1, 2, 3)]
    out = average_checkpoints(paths, tmp_path / "avg.ckpt")
    each = [weights(p) for p in paths]
    averaged = weights(out)
    for name, value in averaged.items():
        expected = (each[0][name].double() + each[1][name].double() + each[2][name].double()) / 3
        assert torch.allclose(value.double(), expected, atol=1e-7), name
    ckpt = read_checkpoint(out)
    assert ckpt["seq2seq"]["decode"]["beam"] == 2  # the first's (seed 1)
    assert "optimizer_states" not in ckpt and "global_step" not in ckpt
    Transformer(CFG).load_state_dict(averaged)  # loads into the model it came from


def test_tied_embeddings_stay_one_tensor(tmp_path):
    paths = [save_checkpoint(tmp_path / f"{s}.ckpt", seed=s) for s in (1, 2)]
    state = read_checkpoint(average_checkpoints(paths, tmp_path / "avg.ckpt"))["state_dict"]
    src, tgt = state["model.src_embed.tokens.weight"], state["model.tgt_embed.tokens.weight"]
    assert src.data_ptr() == tgt.data_ptr()


def test_checkpoints_of_different_shapes_are_refused_naming_the_file(tmp_path):
    a = save_checkpoint(tmp_path / "a.ckpt", seed=1)
    b = save_checkpoint(
        tmp_path / "b.ckpt", seed=1, cfg=preset("tiny", src_vocab_size=41, tgt_vocab_size=41)
    )
    with pytest.raises(CheckpointError, match=r"b\.ckpt: .* has shape"):
        average_checkpoints([a, b], tmp_path / "avg.ckpt")


def test_checkpoints_of_another_tokenizer_or_architecture_are_refused_naming_both(tmp_path):
    """Equal shapes are not one model: two SentencePiece models of one size, or the same
    weights split into another number of heads, average into nothing usable."""
    a = save_checkpoint(tmp_path / "a.ckpt", seed=1)
    b = save_checkpoint(tmp_path / "b.ckpt", seed=2, tokenizer="another spm")
    with pytest.raises(CheckpointError, match=r"b\.ckpt: its tokenizer differs from .*a\.ckpt"):
        average_checkpoints([a, b], tmp_path / "avg.ckpt")
    heads = dataclasses.replace(CFG, n_heads=2 * CFG.n_heads)
    c = save_checkpoint(tmp_path / "c.ckpt", seed=2, cfg=heads)
    said = rf"c\.ckpt: model\.n_heads={2 * CFG.n_heads}, .*a\.ckpt has {CFG.n_heads};"
    with pytest.raises(CheckpointError, match=said):
        average_checkpoints([a, c], tmp_path / "avg.ckpt")
    assert not (tmp_path / "avg.ckpt").exists()


def test_an_existing_output_is_replaced_only_if_it_is_an_earlier_average(tmp_path, capsys):
    paths = [save_checkpoint(tmp_path / f"{s}.ckpt", seed=s) for s in (1, 2)]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    # A user's file and a training checkpoint are refused, and kept.
    for taken in (notes, save_checkpoint(tmp_path / "last.ckpt", seed=3)):
        before = taken.read_bytes()
        assert main(["average", *map(str, paths), "-o", str(taken)]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (
            f"seq2seq average: error: {taken}: exists and is not an averaged checkpoint; "
            "give another -o or move it away"
        )
        assert taken.read_bytes() == before
    out = tmp_path / "avg.ckpt"
    assert main(["average", *map(str, paths), "-o", str(out)]) == 0
    assert main(["average", *map(str, reversed(paths)), "-o", str(out)]) == 0  # re-averaged
    assert read_checkpoint(out)["averaged_from"] == [str(p) for p in reversed(paths)]


def test_cli_averages_the_last_n_of_a_run_directory_by_step(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    # BLEU order and step order differ: --last picks by step.
    for step, bleu, seed in [(900, 20.5, 1), (1000, 30.1, 2), (1100, 25.0, 3), (1200, 22.0, 4)]:
        save_checkpoint(ckpts / f"step{step:07d}-bleu{bleu:.2f}.ckpt", seed=seed)
    assert [p.name[:11] for p in RunDir(tmp_path / "run").best_by_step()] == [
        "step0000900",
        "step0001000",
        "step0001100",
        "step0001200",
    ]
    assert main(["average", "--run-dir", str(tmp_path / "run"), "--last", "2"]) == 0
    printed = capsys.readouterr()
    out = Path(printed.out.strip())
    assert out == ckpts / "averaged.ckpt"
    # The command's log reaches the terminal, as "LEVEL: message" on stderr.
    assert printed.err.splitlines() == [f"INFO: averaged 2 checkpoints into {out}"]
    assert read_checkpoint(out)["averaged_from"] == [
        str(ckpts / "step0001100-bleu25.00.ckpt"),
        str(ckpts / "step0001200-bleu22.00.ckpt"),
    ]


def test_cli_refuses_files_and_run_dir_together(tmp_path, capsys):
    a = save_checkpoint(tmp_path / "a.ckpt", seed=1)
    code = main(["average", str(a), "--run-dir", str(tmp_path), "-o", str(tmp_path / "x.ckpt")])
    assert code == 1 and "either checkpoint files or --run-dir" in capsys.readouterr().err


def test_last_with_checkpoint_files_is_refused_rather_than_ignored(tmp_path, capsys):
    a = save_checkpoint(tmp_path / "a.ckpt", seed=1)
    b = save_checkpoint(tmp_path / "b.ckpt", seed=2)
    out = tmp_path / "x.ckpt"
    assert main(["average", str(a), str(b), "--last", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("--last N picks from --run-dir; checkpoint files are averaged as given")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_last_0_is_refused_rather_than_averaging_every_checkpoint(tmp_path, capsys):
    """`paths[-0:]` is the whole list: --last 0 once averaged them all without a word."""
    from seq2seq.training.average import last_checkpoints

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step, seed in [(100, 1), (200, 2)]:
        save_checkpoint(ckpts / f"step{step:07d}-bleu20.00.ckpt", seed=seed)
    with pytest.raises(SystemExit):
        main(["average", "--run-dir", str(tmp_path / "run"), "--last", "0"])
    assert "argument --last: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--last 0: average at least 1 checkpoint"):
        last_checkpoints(tmp_path / "run", 0)
    assert not (ckpts / "averaged.ckpt").exists()
    assert len(last_checkpoints(tmp_path / "run", 1)) == 1
