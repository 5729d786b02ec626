"""`seq2seq translate`: one output line per input line, order, streaming, n-best, errors."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SLICE, read_gz_lines

import seq2seq.inference.translate as translate
from seq2seq.cli import main
from seq2seq.config import DecodeConfig, preset
from seq2seq.inference.checkpoint import (
    load_model,
    model_weights,
    read_checkpoint,
    skipped_init,
)
from seq2seq.inference.translator import Translator
from seq2seq.nn.transformer import Transformer


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return read_gz_lines(SLICE / "test_2016_flickr.en.gz", 12)


def run_translate(tmp_path: Path, ckpt: Path, data: bytes, *options: str) -> tuple[int, list[str]]:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(data)
    code = main(["translate", "-m", str(ckpt), "-i", str(src), "-o", str(out), *options])
    return code, out.read_text(encoding="utf-8").split("\n")[:-1] if out.exists() else []


def test_one_output_line_per_input_line_and_blank_lines_stay_blank(tmp_path, checkpoint):
    lines = ["A dog runs.", "", "   \t ", "Two men are talking.", "A girl"]
    code, out = run_translate(tmp_path, checkpoint, ("\n".join(lines) + "\n").encode())
    assert code == 0
    assert len(out) == len(lines)
    assert out[1] == "" and out[2] == ""
    assert all(out[i] for i in (0, 3, 4))  # a random model still says something


@pytest.mark.parametrize("invisible", ["\u200b", "\ufeff", "\x01"])
def test_a_line_of_only_invisible_characters_gives_a_blank_line(tmp_path, checkpoint, invisible):
    """SentencePiece makes no pieces of it; decoded from EOS alone, the model would invent a
    sentence."""
    lines = ["A dog runs.", invisible, "", "A girl"]
    code, out = run_translate(tmp_path, checkpoint, ("\n".join(lines) + "\n").encode())
    assert code == 0 and out[1] == "" and out[2] == ""
    code, out = run_translate(tmp_path, checkpoint, f"{invisible}\n".encode(), "--nbest", "2")
    assert code == 0 and out == ["0 ||| 0.0000 ||| "]


def test_a_last_line_without_newline_and_crlf_endings_count_as_lines(tmp_path, checkpoint):
    code, out = run_translate(tmp_path, checkpoint, b"A dog.\r\nA cat.\r\nA man.")
    assert code == 0 and len(out) == 3


def test_over_long_line_is_truncated_with_a_warning_naming_it(tmp_path, checkpoint, caplog):
    long = " ".join(["A man in a red shirt."] * 20)  # far more than 48 pieces
    with caplog.at_level(logging.WARNING, logger="seq2seq.inference.translate"):
        code, out = run_translate(tmp_path, checkpoint, f"A dog.\n{long}\nA cat.\n".encode())
    assert code == 0 and len(out) == 3
    assert any("in.txt:2:" in r.message and "truncated" in r.message for r in caplog.records)


def test_undecodable_bytes_stop_with_the_line_number(tmp_path, checkpoint, capsys):
    code, _ = run_translate(tmp_path, checkpoint, b"A dog.\nA cat.\nA \xff man.\n")
    assert code == 1
    *settings, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("seq2seq translate: error: ") and "in.txt:3: invalid UTF-8" in error
    assert [line.split(": ")[0] for line in settings] == ["INFO"]  # the model's settings line


def test_errors_replace_translates_undecodable_lines(tmp_path, checkpoint):
    code, out = run_translate(tmp_path, checkpoint, b"A dog.\nA \xff man.\n", "--errors", "replace")
    assert code == 0 and len(out) == 2


def test_order_is_kept_for_inputs_of_shuffled_lengths(checkpoint, sentences):
    loaded = load_model(checkpoint)
    model = loaded.model.double()  # float64: batched and alone give the same argmax
    lines = sorted(sentences, key=lambda s: (hash(s) % 7, len(s)))  # lengths out of order
    cfg = DecodeConfig(beam=2, max_len_a=1.0, max_len_b=4, max_tokens=60)
    translator = Translator([model], loaded.tokenizer, cfg)
    together = translator.translate_texts(lines, cfg)
    alone = [translator.translate_texts([s], cfg)[0] for s in lines]
    assert together == alone
    assert len(translate.make_batches([len(s) for s in lines], 60)) > 1


def test_max_sentences_caps_each_batch_and_keeps_every_line_in_length_order():
    lengths = [5, 0, 3, 9, 3, 7, 1, 4, 4, 2]
    batches = translate.make_batches(lengths, max_tokens=1000, max_sentences=4)
    assert [len(b) for b in batches] == [4, 4, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [i for i, n in enumerate(lengths) if n]  # the blank line left out
    assert [lengths[i] for i in flat] == sorted(n for n in lengths if n)
    assert translate.make_batches(lengths, 1000) == [flat]  # no cap: one batch


def test_max_sentences_on_the_command_line_gives_the_same_output(tmp_path, checkpoint, sentences):
    data = ("\n".join(sentences) + "\n").encode()
    _, whole = run_translate(tmp_path, checkpoint, data, "--beam", "1")
    code, capped = run_translate(tmp_path, checkpoint, data, "--beam", "1", "--max-sentences", "3")
    assert code == 0 and capped == whole


def test_streaming_in_chunks_gives_the_same_output(tmp_path, checkpoint, sentences, monkeypatch):
    data = ("\n".join(sentences) + "\n").encode()
    _, whole = run_translate(tmp_path, checkpoint, data, "--beam", "1")
    monkeypatch.setattr(translate, "CHUNK_LINES", 5)
    _, chunked = run_translate(tmp_path, checkpoint, data, "--beam", "1")
    assert chunked == whole and len(whole) == len(sentences)


def test_nbest_lines_are_indexed_by_input_line_and_sorted_by_score(tmp_path, checkpoint):
    data = b"A dog runs.\n\nTwo men are talking.\n"
    code, out = run_translate(tmp_path, checkpoint, data, "--beam", "3", "--nbest", "3")
    assert code == 0
    rows = [line.split(" ||| ") for line in out]
    assert all(len(r) == 3 for r in rows)
    assert [r for r in rows if r[0] == "1"] == [["1", "0.0000", ""]]
    for index in ("0", "2"):
        scores = [float(r[1]) for r in rows if r[0] == index]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_nbest_larger_than_beam_is_one_clear_error(tmp_path, checkpoint, capsys):
    code, _ = run_translate(tmp_path, checkpoint, b"A dog.\n", "--beam", "2", "--nbest", "3")
    assert code == 1 and "decode.nbest=3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--lenpen", "nan"), "decode.lenpen=nan must be a finite number"),
        (("--max-len-a", "inf"), "decode.max_len_a=inf must be a finite number >= 0"),
        (("--max-len-a", "-1"), "decode.max_len_a=-1.0 must be a finite number >= 0"),
        (("--max-len-b", "-100"), "decode.max_len_b=-100 must be >= 0"),
        (("--min-len", "-3"), "decode.min_len=-3 must be >= 0"),
        (("--max-len-a", "0", "--max-len-b", "0"), "leave no room for output"),
    ],
)
def test_nonsense_length_and_penalty_settings_are_one_clear_error(
    tmp_path, checkpoint, capsys, options, message
):
    """Before, --max-len-a inf or --max-len-b -100 silently cut every translation to 1 token
    and --lenpen nan ranked hypotheses by NaN."""
    code, out = run_translate(tmp_path, checkpoint, b"A dog.\n", *options)
    err = capsys.readouterr().err
    assert code == 1 and out == [] and len(err.strip().splitlines()) == 1
    assert message in err


def test_a_checkpoint_whose_saved_decoding_settings_are_refused_names_the_file(
    tmp_path, checkpoint, capsys
):
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["seq2seq"]["decode"]["max_len_b"] = -5  # accepted by an older version
    bad = tmp_path / "old.ckpt"
    torch.save(ckpt, bad)
    code, out = run_translate(tmp_path, bad, b"A dog.\n")
    err = capsys.readouterr().err
    assert code == 1 and out == [] and len(err.strip().splitlines()) == 1
    assert "old.ckpt: decode.max_len_b=-5 must be >= 0" in err


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_translate_every_line(tmp_path, checkpoint, precision):
    code, out = run_translate(tmp_path, checkpoint, b"A dog.\nA cat.\n", "--precision", precision)
    assert code == 0 and len(out) == 2 and all(out)


def test_device_auto_runs_int8_on_the_cpu_even_where_a_gpu_is_present(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = translate.prepare_model(load_model(checkpoint).model, "auto", "int8")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # quantized
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        translate.prepare_model(load_model(checkpoint).model, "cuda", "int8")


def test_int8_names_the_missing_quantizer_where_torch_has_dropped_it(
    tmp_path, checkpoint, monkeypatch, capsys
):
    monkeypatch.delattr(torch.ao.quantization, "quantize_dynamic")
    code, out = run_translate(tmp_path, checkpoint, b"A dog.\n", "--precision", "int8")
    err = capsys.readouterr().err
    assert code == 1 and out == [] and len(err.strip().splitlines()) == 1
    assert "--precision int8 needs torch.ao.quantization.quantize_dynamic" in err


def test_int8_quantizes_the_linear_layers_and_the_output_projection_only(checkpoint):
    original = load_model(checkpoint).model.eval()
    model = translate.prepare_model(original, "cpu", "int8")
    names = {type(m).__name__ for m in model.modules()}
    assert "Linear" in names  # the dynamically quantized linear (torch.ao...dynamic.Linear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert type(model.generator) is not torch.nn.Linear  # the projection is quantized too
    assert model.tgt_embed.tokens.weight.dtype == torch.float32  # embeddings stay float32
    assert type(original.generator) is torch.nn.Linear  # the checkpoint's model is left as it was
    states = torch.randn(6, original.cfg.d_model)
    with torch.no_grad():
        exact, quantized = original.project(states), model.project(states)
    assert (quantized - exact).abs().max() < 0.05 * exact.abs().max()


def test_attention_heatmaps_are_written_one_per_translated_line(tmp_path, checkpoint):
    heatmaps = tmp_path / "attention"
    code, out = run_translate(
        tmp_path, checkpoint, b"A dog.\n\nA red car.\n", "--attention", str(heatmaps)
    )
    assert code == 0 and len(out) == 3
    assert sorted(p.name for p in heatmaps.iterdir()) == ["line0000001.png", "line0000003.png"]


def test_cross_attention_rows_are_distributions_over_real_source_tokens(checkpoint):
    from seq2seq.inference.attention import cross_attention

    model = load_model(checkpoint).model
    src = torch.tensor([[20, 21, 3, 0, 0], [20, 21, 22, 23, 3]])
    weights = cross_attention(model, src, torch.tensor([[2, 30, 31], [2, 30, 31]]))
    assert weights.shape == (2, 3, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3))
    assert weights[0, :, 3:].abs().max() == 0  # padding gets no attention


def test_stdin_to_stdout_pipes_translations_only(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq", "translate", "-m", str(checkpoint), "--beam", "1"],
        input=b"A dog runs.\n\nA man.\n",
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split("\n")
    assert len(out) == 4 and out[1] == "" and out[3] == ""  # 3 lines, each ended by "\n"
    assert b"beam 1" in result.stderr  # the log goes to stderr


def test_evaluate_with_a_model_translates_then_scores(tmp_path, checkpoint, capsys):
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("A dog runs.\nA man.\n", encoding="utf-8")
    ref.write_text("Ein Hund rennt.\nEin Mann.\n", encoding="utf-8")
    code = main(["evaluate", "-m", str(checkpoint), "--src", str(src), "--ref", str(ref)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("BLEU|nrefs:1|") and "chrF2|nrefs:1|" in out


def test_evaluate_names_its_source_file_in_truncation_warnings(tmp_path, checkpoint, caplog):
    """As `translate -i` does, not "<input>"."""
    src, ref = tmp_path / "long.en", tmp_path / "ref.de"
    src.write_text(" ".join(["A man in a red shirt."] * 20) + "\n", encoding="utf-8")
    ref.write_text("Ein Mann.\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="seq2seq.inference.translate"):
        code = main(["evaluate", "-m", str(checkpoint), "--src", str(src), "--ref", str(ref)])
    assert code == 0
    assert any(r.message.startswith(f"{src}:1: ") for r in caplog.records)


def test_an_averaged_checkpoint_translates_like_its_source(tmp_path, checkpoint):
    from seq2seq.training.average import average_checkpoints

    averaged = average_checkpoints([checkpoint, checkpoint], tmp_path / "avg.ckpt")
    data = b"A dog runs.\nTwo men are talking.\n"
    _, before = run_translate(tmp_path, checkpoint, data)
    _, after = run_translate(tmp_path, averaged, data)
    assert after == before and len(after) == 2


def test_batches_cut_for_streams_are_a_multiple_of_them_even_and_longest_sentences_first():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 40, size=1000)] + [0, 0]
    plain = translate.make_batches(lengths, 6000)
    batches = translate.make_batches(lengths, 6000, streams=2)
    assert len(plain) % 2 == 1 and len(batches) % 2 == 0
    flat = sorted(i for b in batches for i in b)
    assert flat == [i for i, n in enumerate(lengths) if n]  # each line once, blanks left out
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    assert max(padded) <= 6000
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest == sorted(longest, reverse=True)  # the longest sentences first
    assert min(padded) >= 0.9 * max(padded)  # even: no small last batch left to one stream
    assert translate.make_batches(lengths, 6000, streams=1) == plain


def test_a_batch_that_would_be_alone_is_split_between_the_streams():
    assert [len(b) for b in translate.make_batches([5] * 10, 1000, streams=2)] == [5, 5]
    assert translate.make_batches([5], 1000, streams=2) == [[0]]  # one sentence: one batch


def test_a_loaded_model_holds_the_saved_weights_with_its_tied_ones_one_parameter(checkpoint):
    model = load_model(checkpoint).model
    saved = model_weights(read_checkpoint(checkpoint))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert model.generator.weight is model.src_embed.tokens.weight
    fresh = Transformer(model.cfg)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert torch.equal(model.src_embed.positions, fresh.src_embed.positions)  # computed


def test_loading_leaves_torchs_initializers_as_they_were(checkpoint):
    originals = (torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.normal_)
    load_model(checkpoint)
    with pytest.raises(RuntimeError, match="inside"), skipped_init():
        assert torch.nn.init.normal_ is not originals[2]
        raise RuntimeError("an error inside")
    assert (torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.normal_) == (
        originals
    )
    torch.manual_seed(0)
    first = torch.nn.Linear(16, 16).weight.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(16, 16).weight, first)
    assert first.std() > 0.1


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_prepared_models_relus_overwrite_their_input_with_the_same_states(precision):
    """prepare_model makes the feed-forward ReLUs in place (decoding needs no autograd): the
    encoder's output is unchanged, and the model it was given keeps its own (int8 copies)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).eval()
    src = torch.randint(4, 30, (3, 7))
    with torch.inference_mode():
        want = model.encode(src).states
        prepared = translate.prepare_model(model, "cpu", precision, pack_weights=False)
        got = prepared.encode(src).states
    relus = [m for m in prepared.modules() if type(m) is torch.nn.ReLU]
    assert relus and all(relu.inplace for relu in relus)
    if precision == "fp32":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert not any(m.inplace for m in model.modules() if type(m) is torch.nn.ReLU)
        assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_arriving_lines_are_split_as_they_come_and_ready_says_what_has_arrived():
    import os

    read_end, write_end = os.pipe()
    try:
        lines = translate.ArrivingLines(read_end)
        assert not lines.ready()  # nothing written yet: no waiting
        os.write(write_end, b"A dog")
        assert not lines.ready()  # half a line
        os.write(write_end, b" runs.\r\nA cat.\nA m")
        assert lines.ready()
        assert [next(lines), next(lines)] == [b"A dog runs.\r\n", b"A cat.\n"]
        assert not lines.ready()
        os.write(write_end, b"an.")
    finally:
        os.close(write_end)
    assert lines.ready()  # the end has arrived
    assert list(lines) == [b"A man."]  # a last line without "\n"
    os.close(read_end)


def test_chunks_end_where_the_arrived_lines_do():
    arrived = iter([True, False, True, True, False])
    got = list(translate.chunked([f"l{i}" for i in range(6)], 3, lambda: next(arrived)))
    assert got == [["l0", "l1"], ["l2", "l3", "l4"], ["l5"]]


def test_a_line_written_to_a_pipe_is_translated_before_the_next_arrives(tmp_path, checkpoint):
    """As from a person typing, or a program that waits for each translation: the command
    does not wait for 10,000 lines or the end of its input."""
    import select

    first, second = "A dog runs.", "Two men are talking."
    code, want = run_translate(tmp_path, checkpoint, f"{first}\n{second}\n".encode(), "--beam", "1")
    assert code == 0
    command = [sys.executable, "-m", "seq2seq", "translate", "-m", str(checkpoint), "--beam", "1"]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        got = []
        for line in (first, second):
            proc.stdin.write(f"{line}\n".encode())
            proc.stdin.flush()
            assert select.select([proc.stdout], [], [], 120)[0], "no translation while waiting"
            got.append(proc.stdout.readline().decode().rstrip("\n"))
        proc.stdin.close()
        assert proc.stdout.read() == b"" and proc.wait(60) == 0
    assert got == want


@pytest.mark.parametrize(
    ("redirect", "message"),
    [
        ("<&-", "standard input is closed: pipe text in, or give -i FILE"),
        ("<<< 'A dog.' >&-", "standard output is closed: give -o FILE"),
    ],
)
def test_a_closed_stdin_or_stdout_is_one_clear_error(checkpoint, redirect, message):
    """Python sets sys.stdin / sys.stdout to None; it was an AttributeError traceback."""
    command = f"'{sys.executable}' -m seq2seq translate -m '{checkpoint}' --beam 1 {redirect}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"seq2seq translate: error: {message}"
    assert "Traceback" not in result.stderr


def test_typed_at_a_terminal_each_line_is_answered_and_no_progress_bar_is_drawn(checkpoint):
    """stdin and stderr on a terminal (a pseudo-terminal here): a bar redrawn between the
    lines a person types would garble them."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # bars need width
    command = [sys.executable, "-m", "seq2seq", "translate", "-m", str(checkpoint), "--beam", "1"]
    with subprocess.Popen(command, stdin=slave, stdout=subprocess.PIPE, stderr=slave) as proc:
        os.close(slave)
        os.write(master, b"A dog runs.\n")
        assert select.select([proc.stdout], [], [], 120)[0], "no translation while waiting"
        assert proc.stdout.readline().strip()
        os.write(master, b"\x04")  # Ctrl-D: the end of the input
        assert proc.wait(60) == 0
        terminal = b""
        while select.select([master], [], [], 0)[0]:
            try:
                terminal += os.read(master, 1 << 16)
            except OSError:  # the child has closed its side
                break
    os.close(master)
    assert b" sent" not in terminal and b"A dog runs." in terminal  # the echo, no bar
