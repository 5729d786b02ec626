"""`seq2seq export --to hf|ctranslate2`: the exported models compute our function (float32
parity on the 200 test sentences of the slice), load offline, and bad input gets one line."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MAX_POSITIONS, SLICE, read_gz_lines, write_checkpoint

from seq2seq.cli import main
from seq2seq.config import DecodeConfig
from seq2seq.export import compare
from seq2seq.export.hf import basis_permutation
from seq2seq.inference.checkpoint import load_model, read_checkpoint
from seq2seq.inference.streams import stream_kind
from seq2seq.inference.translate import encode_lines, pad_batch
from seq2seq.inference.translator import Translator
from seq2seq.kernels.cpu import cpu_is_intel
from seq2seq.kernels.mkl import mkl_packing_works
from seq2seq.kernels.onednn import packing_works
from seq2seq.nn.transformer import Transformer, sinusoidal_positions

transformers = pytest.importorskip("transformers")  # CI installs the extra: these run there
ctranslate2 = pytest.importorskip("ctranslate2")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")


def decode_ids(loaded, src_ids, cfg):
    """Our hypotheses per source with the plain model (the export's reference)."""
    return Translator([loaded.model], loaded.tokenizer, cfg).translate_ids(src_ids, cfg)


def export(model: Path, to: str, out: Path, *options: str) -> int:
    return main(["export", "-m", str(model), "--to", to, str(out), *options])


@pytest.fixture(scope="module")
def sources() -> list[str]:
    return read_gz_lines(SLICE / "test_2016_flickr.en.gz")  # the 200 test sentences


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def src_ids(loaded, sources) -> list[list[int]]:
    return compare.source_ids(loaded, sources)


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export(checkpoint, "hf", out) == 0
    return out


@pytest.fixture(scope="module")
def marian(hf_dir):
    model = transformers.MarianMTModel.from_pretrained(str(hf_dir)).eval()
    return model, transformers.MarianTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def ours_greedy(checkpoint, sources, tmp_path_factory) -> list[str]:
    """What `seq2seq translate --beam 1` writes for the 200 sentences."""
    folder = tmp_path_factory.mktemp("greedy")
    (folder / "in.en").write_text("\n".join(sources) + "\n", encoding="utf-8")
    args = ["-i", str(folder / "in.en"), "-o", str(folder / "out.de"), "--beam", "1"]
    assert main(["translate", "-m", str(checkpoint), *args]) == 0
    return (folder / "out.de").read_text(encoding="utf-8").split("\n")[:-1]


def limits(loaded, src_ids, cfg: DecodeConfig) -> list[int]:
    return compare.output_limits(src_ids, cfg, loaded.model.cfg.max_positions)


# --- Hugging Face ---------------------------------------------------------------------------
def test_hf_folder_holds_the_marian_files_and_loads_offline(hf_dir, marian):
    names = {p.name for p in hf_dir.iterdir()}
    for name in ("config.json", "model.safetensors", "generation_config.json", "source.spm"):
        assert name in names
    assert {"target.spm", "vocab.json", "tokenizer_config.json"} <= names
    model, tok = marian
    out = model.generate(**tok(["A dog runs in the snow."], return_tensors="pt"), max_new_tokens=5)
    assert out[0, 0] == 2 and isinstance(tok.decode(out[0], skip_special_tokens=True), str)


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) >= 5,
    reason="transformers 5 removed the translation pipeline (MIGRATION_GUIDE_V5.md)",
)
def test_hf_folder_loads_in_the_translation_pipeline(hf_dir):
    pipe = transformers.pipeline("translation", model=str(hf_dir), device="cpu")
    out = pipe(["A dog runs in the snow."], max_new_tokens=5)
    assert isinstance(out[0]["translation_text"], str)


def test_generation_config_holds_our_decoding_defaults(hf_dir, loaded):
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    config = json.loads((hf_dir / "config.json").read_text())
    decode = loaded.decode  # the fixture's: beam 2, lenpen 0.6, a=1.0, b=4
    assert (gen["num_beams"], gen["length_penalty"]) == (decode.beam, decode.lenpen)
    assert (gen["seq2seq_max_len_a"], gen["seq2seq_max_len_b"]) == (1.0, 4)
    assert gen["max_length"] == MAX_POSITIONS + 1 and gen["decoder_start_token_id"] == 2
    assert config["decoder_start_token_id"] == 2 and config["scale_embedding"] is True


def test_marian_position_table_is_ours_in_the_permuted_basis(marian):
    model, _ = marian
    ours = sinusoidal_positions(MAX_POSITIONS, model.config.d_model)
    theirs = model.model.encoder.embed_positions.weight
    assert torch.equal(theirs, ours[:, basis_permutation(model.config.d_model)])
    assert torch.equal(model.model.decoder.embed_positions.weight, theirs)


def test_marian_tokenizer_gives_our_source_ids_and_decodes_our_target_ids(marian, loaded, sources):
    _, tok = marian
    short = [
        s
        for s, ids in zip(sources, encode_lines(loaded.tokenizer, sources, 10**6), strict=True)
        if ids
    ]
    assert tok(short)["input_ids"] == loaded.tokenizer.encode_src(short)  # pieces + EOS, no BOS
    ids = loaded.tokenizer.encode_tgt(["Ein Hund läuft im Schnee."])[0]
    assert tok.decode([2, *ids, 3], skip_special_tokens=True) == loaded.tokenizer.decode_tgt(ids)


def test_hf_greedy_equals_translate_beam_1_line_for_line(
    marian, loaded, src_ids, sources, ours_greedy
):
    model, tok = marian
    cfg = DecodeConfig(beam=1, max_len_a=loaded.decode.max_len_a, max_len_b=loaded.decode.max_len_b)
    theirs = compare.hf_translate(model, tok, src_ids, limits(loaded, src_ids, cfg), 1, 4096)
    assert len(ours_greedy) == len(sources) == 200
    assert theirs == ours_greedy


def test_hf_decoder_log_probs_agree_within_1e_4_at_every_step(marian, loaded, src_ids):
    """Teacher-forced on our greedy outputs: every position's whole distribution."""
    model, _ = marian
    cfg = DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4)
    hyps = decode_ids(loaded, src_ids, cfg)
    tgt_in = [[2, *h[0].tokens] for h in hyps]
    src, tgt = pad_batch(src_ids, torch.device("cpu")), pad_batch(tgt_in, torch.device("cpu"))
    with torch.inference_mode():
        ours = loaded.model.project(loaded.model(src, tgt)).log_softmax(-1)
        theirs = model(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt)
    theirs = theirs.logits.log_softmax(-1)
    real = torch.zeros(tgt.shape, dtype=torch.bool)
    for i, seq in enumerate(tgt_in):
        real[i, : len(seq)] = True
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


def test_hf_beam_5_agrees_on_99_percent_of_lines_under_matched_settings(marian, loaded, src_ids):
    """Length penalty off (the forms differ), both stopping once 5 hypotheses have ended."""
    model, tok = marian
    cfg = DecodeConfig(beam=5, lenpen=0.0, stop="beam", max_len_a=1.0, max_len_b=4)
    hyps = decode_ids(loaded, src_ids, cfg)
    ours = [loaded.tokenizer.decode_tgt(h[0].tokens) for h in hyps]
    theirs = compare.hf_translate(model, tok, src_ids, limits(loaded, src_ids, cfg), 5, 4096)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same >= 0.99 * len(ours)


# --- CTranslate2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct2_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ct2"
    assert export(checkpoint, "ctranslate2", out) == 0
    return out


def ct2_greedy(folder: Path, loaded, src_ids) -> list[str]:
    translator = ctranslate2.Translator(str(folder), device="cpu", intra_threads=1)
    cfg = DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4)
    lim = limits(loaded, src_ids, cfg)
    return compare.ct2_translate(translator, loaded.tokenizer, src_ids, lim, 1, 4096)


def test_ctranslate2_greedy_equals_ours_on_the_200_sentences(ct2_dir, loaded, src_ids, ours_greedy):
    assert {"model.bin", "config.json", "source.spm", "target.spm"} <= set(
        p.name for p in ct2_dir.iterdir()
    )
    assert ct2_greedy(ct2_dir, loaded, src_ids) == ours_greedy


def test_ctranslate2_in_batches_of_a_few_sentences_still_equals_ours(
    ct2_dir, loaded, src_ids, ours_greedy
):
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", intra_threads=1)
    lim = limits(loaded, src_ids, DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4))
    calls = compare._batches(src_ids, lim, 4096, exact=True, max_sentences=7)
    assert max(len(batch) for _, batch in calls) == 7
    assert sorted(i for _, batch in calls for i in batch) == list(range(len(src_ids)))
    texts = compare.ct2_translate(
        translator, loaded.tokenizer, src_ids, lim, 1, 4096, max_sentences=7
    )
    assert texts == ours_greedy


def test_the_ctranslate2_worker_decodes_again_per_call_and_reports_its_kernels(
    ct2_dir, loaded, sources, tmp_path
):
    """bench's CTranslate2 side: a process of its own that answers each call with its decode
    seconds and the lines of ct2_file.py's whole-file run, and logs its CPU kernels."""
    from seq2seq.export.processes import SCRIPT, Ct2Worker, ct2_file_args

    lines = sources[:10]
    lines.insert(2, "")  # a blank line stays a blank line
    args = ct2_file_args(loaded, 1, "float32", None)
    with Ct2Worker(ct2_dir, lines, tmp_path, args, dict(os.environ)) as worker:
        kernels = worker.kernels("float32")
        greedy = [worker(1) for _ in range(2)]
        beam = worker(5)
        process = worker.process
    assert process.poll() == 0  # ended with the context
    assert "Selected ISA: " in kernels and "SGEMM backend: " in kernels
    assert all(seconds > 0 for seconds, _ in [*greedy, beam])
    assert greedy[0][1] == greedy[1][1] and len(greedy[0][1]) == len(lines)
    assert greedy[0][1][2] == "" and beam[1][2] == "" and all(beam[1][:2])
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, str(SCRIPT), str(ct2_dir), str(tmp_path / "in.txt")]
    subprocess.run([*command, str(tmp_path / "out.txt"), *args], check=True)
    assert greedy[0][1] == (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()


def test_ctranslate2_decoding_batches_side_by_side_gives_the_same_lines(
    ct2_dir, loaded, sources, tmp_path
):
    """bench runs CTranslate2 as ours runs: one batch per thread (inter_threads), each on one
    intra-op thread; the lines are those of one batch at a time."""
    from seq2seq.export.processes import SCRIPT, ct2_file_args, ct2_threading

    side_by_side = ct2_file_args(loaded, 2, "float32", 3, inter_threads=2)
    assert side_by_side[:4] == ["--threads", "1", "--inter-threads", "2"]
    assert ct2_threading(2, None) == "inter_threads=2, intra_threads=1"
    assert ct2_threading(2, 1) == "inter_threads=1, intra_threads=2"
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in sources[:12]), "utf-8")
    outs = []
    for args in (side_by_side, ct2_file_args(loaded, 1, "float32", 3)):
        out = tmp_path / f"out{len(outs)}.txt"
        command = [sys.executable, str(SCRIPT), str(ct2_dir), str(tmp_path / "in.txt"), str(out)]
        subprocess.run([*command, "--beam", "2", *args], check=True)
        outs.append(out.read_text(encoding="utf-8").splitlines())
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_a_ctranslate2_worker_that_cannot_load_fails_with_its_last_line(tmp_path):
    from seq2seq.export.processes import Ct2Worker

    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"^ct2_file.py --serve failed: .+"):
        Ct2Worker(tmp_path / "empty", ["A dog."], tmp_path, [], dict(os.environ))


def test_ctranslate2_int8_export_loads_and_translates(checkpoint, tmp_path, loaded, src_ids):
    out = tmp_path / "int8"
    assert export(checkpoint, "ctranslate2", out, "--quantization", "int8") == 0
    config = json.loads((out / "config.json").read_text())
    texts = ct2_greedy(out, loaded, src_ids[:20])
    assert len(texts) == 20 and all(texts)
    assert config.get("add_source_eos") is True


@pytest.fixture(scope="module")
def pre_norm_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The fixture's tokenizer and shape with pre-norm layers (random weights)."""
    extra = read_checkpoint(checkpoint)["seq2seq"]
    cfg = load_model(checkpoint).model.cfg
    cfg = type(cfg)(**{**extra["model_config"], "pre_norm": True})
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pre-norm") / "pre.ckpt"
    return write_checkpoint(
        path, Transformer(cfg), extra["tokenizer"], DecodeConfig(**extra["decode"])
    )


def test_a_pre_norm_model_exports_to_ctranslate2_with_greedy_parity(
    pre_norm_checkpoint, tmp_path, sources
):
    loaded = load_model(pre_norm_checkpoint)
    ids = compare.source_ids(loaded, sources[:50])
    cfg = DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4)
    ours = [loaded.tokenizer.decode_tgt(h[0].tokens) for h in decode_ids(loaded, ids, cfg)]
    assert export(pre_norm_checkpoint, "ctranslate2", tmp_path / "ct2") == 0
    assert ct2_greedy(tmp_path / "ct2", loaded, ids) == ours


def test_a_lowercasing_model_exports_a_tokenizer_that_lowercases_too(
    multi30k_slice, tmp_path, sources
):
    import sentencepiece as spm

    from seq2seq.config import TokenizerConfig, preset
    from seq2seq.data.tokenizer import Tokenizer

    en = read_gz_lines(multi30k_slice / "train.en.gz", 300)
    de = read_gz_lines(multi30k_slice / "train.de.gz", 300)
    cfg = TokenizerConfig(vocab_size=250, lowercase=True)
    tok = Tokenizer.train(en, de, cfg, tmp_path / "tokenizer")
    shape = preset("tiny", src_vocab_size=250, tgt_vocab_size=250, max_positions=MAX_POSITIONS)
    path = write_checkpoint(
        tmp_path / "lc.ckpt", Transformer(shape), tok.to_state(), DecodeConfig(beam=1)
    )
    assert export(path, "hf", tmp_path / "hf") == 0  # a beam-1 model: no beam rule saved
    assert export(path, "ctranslate2", tmp_path / "ct2") == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and not generation.get("early_stopping", False)

    lines = [line.upper() for line in sources[:20]]
    want = tok.encode_src([line.lower() for line in sources[:20]])
    assert tok.encode_src(lines) == want
    marian = transformers.MarianTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert marian(lines)["input_ids"] == want
    ct2_spm = spm.SentencePieceProcessor(model_file=str(tmp_path / "ct2" / "source.spm"))
    assert ct2_spm.encode(lines, add_eos=True) == want


def with_decode(checkpoint: Path, path: Path, **decode) -> Path:
    """A copy of `checkpoint` with other saved decoding defaults."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["seq2seq"]["decode"].update(decode)
    torch.save(ckpt, path)
    return path


def test_a_greedy_model_with_a_length_penalty_exports_to_hf(checkpoint, tmp_path):
    """The penalty is a beam setting: GenerationConfig refuses to save it beside num_beams 1."""
    path = with_decode(checkpoint, tmp_path / "greedy.ckpt", beam=1, lenpen=0.6)
    assert export(path, "hf", tmp_path / "hf") == 0
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert generation.num_beams == 1 and generation.length_penalty == 1.0


def test_the_hf_tokenizer_truncates_as_translate_and_generate_runs_on_the_result(
    hf_dir, marian, loaded, sources
):
    """model_max_length is the model's position count: an over-long line, truncated as
    translate truncates it (pieces then EOS), fits Marian's position table."""
    model, tok = marian
    long = [s for s in sources if len(loaded.tokenizer.encode_src([s])[0]) > MAX_POSITIONS][:2]
    assert long and tok.model_max_length == MAX_POSITIONS
    batch = tok(long, truncation=True, padding=True, return_tensors="pt")
    want = encode_lines(loaded.tokenizer, long, MAX_POSITIONS)
    assert [row[row != 0].tolist() for row in batch["input_ids"]] == want
    assert model.generate(**batch, num_beams=1, max_new_tokens=3).shape[0] == 2


def test_the_hf_tokenizer_reads_special_token_text_as_text_as_ours_does(marian, loaded):
    """'</s>' typed in a line is characters to SentencePiece, never an EOS mid-sentence."""
    _, tok = marian
    lines = ["<s> A dog </s> runs <unk> in <pad> snow."]
    assert tok(lines)["input_ids"] == loaded.tokenizer.encode_src(lines)


# --- Bad input ------------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_pre_norm_model_is_refused_as_marian_with_one_line_naming_the_feature(
    pre_norm_checkpoint, tmp_path, capsys
):
    capsys.readouterr()
    assert export(pre_norm_checkpoint, "hf", tmp_path / "hf") == 1
    assert "model.pre_norm" in one_error_line(capsys)
    assert not (tmp_path / "hf").exists()


def test_a_non_empty_folder_is_refused_without_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    capsys.readouterr()
    assert export(checkpoint, "ctranslate2", out) == 1
    assert "--overwrite" in one_error_line(capsys)
    assert (out / "config.json").read_text() == "{}"


def test_overwrite_replaces_an_earlier_export_but_never_a_foreign_file(
    checkpoint, tmp_path, capsys
):
    out = tmp_path / "out"
    assert export(checkpoint, "ctranslate2", out) == 0
    assert export(checkpoint, "ctranslate2", out, "--overwrite") == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert export(checkpoint, "ctranslate2", out, "--overwrite") == 1
    assert "notes.txt" in one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.bin").exists()


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "overwrite"])
def test_an_export_interrupted_while_moving_in_leaves_no_folder_that_loads(
    checkpoint, tmp_path, monkeypatch, earlier
):
    """Stopped at each move into OUT in turn (a SIGTERM there), OUT is absent, or holds no
    config.json (neither engine loads it), or is the whole new export."""
    out = tmp_path / "out"
    if earlier:
        assert export(checkpoint, "ctranslate2", out) == 0
    state = {"stop_at": 0, "moves": 0}

    def stopping(real):
        def move(src, dst, *args, **kwargs):
            if Path(dst) == out or Path(dst).parent == out:
                state["moves"] += 1
                if state["moves"] == state["stop_at"]:
                    raise RuntimeError("interrupted")
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "replace", stopping(os.replace))
    monkeypatch.setattr(os, "rename", stopping(os.rename))
    for stop_at in range(1, 20):
        state["stop_at"], state["moves"] = stop_at, 0
        if export(checkpoint, "ctranslate2", out, "--overwrite") == 0:
            break
        assert not out.exists() or not (out / "config.json").exists()
        assert [p.name for p in tmp_path.iterdir()] in ([], ["out"])  # no staging left
        if earlier:  # the earlier export, whole again
            state["stop_at"] = 0
            assert export(checkpoint, "ctranslate2", out, "--overwrite") == 0
    monkeypatch.undo()
    assert stop_at > 1
    ctranslate2.Translator(str(out), device="cpu")


def test_a_refused_export_leaves_no_folders_it_made(pre_norm_checkpoint, checkpoint, tmp_path):
    assert export(pre_norm_checkpoint, "hf", tmp_path / "a" / "b" / "hf") == 1
    assert export(checkpoint, "ctranslate2", tmp_path / "c" / "ct2", "--quantization", "int3") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_not_ours_gets_the_same_error_as_translate(tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    capsys.readouterr()
    assert main(["translate", "-m", str(foreign), "-i", str(foreign)]) == 1
    translate_error = one_error_line(capsys).split("error: ", 1)[1]
    assert export(foreign, "hf", tmp_path / "out") == 1
    assert one_error_line(capsys) == f"seq2seq export: error: {translate_error}"


def test_without_the_extra_the_command_names_pip_install_export(
    checkpoint, tmp_path, monkeypatch, capsys
):
    real = importlib.import_module

    def missing(name, *args):
        if name.split(".")[0] in ("transformers", "ctranslate2"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    for to in ("hf", "ctranslate2"):
        capsys.readouterr()
        assert export(checkpoint, to, tmp_path / to) == 1
        assert "pip install -e .[export]" in one_error_line(capsys)
        assert not (tmp_path / to).exists()


# --- bench --against ------------------------------------------------------------------------
@pytest.mark.parametrize("against", ["ctranslate2", "hf"])
def test_bench_against_reports_both_engines_speed_ratio_and_bleu(
    checkpoint, multi30k_slice, against, capsys
):
    args = ["bench", "-m", str(checkpoint), "--against", against, "--sentences", "8"]
    args += ["--rounds", "1", "--json", "--data.root", str(multi30k_slice)]
    args += ["--max-sentences", "3"] if against == "ctranslate2" else []
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for search in ("greedy", "beam5"):
        for engine in ("ours", against):
            assert result[f"{search}_{engine}_sentences_per_s"] > 0
            assert f"{search}_{engine}_bleu" in result
        assert result[f"{search}_ratio_ours_over_{against}"] > 0
    assert result["sentences"] == 8 and "threads" in result["settings"]
    assert f"one stream per thread ({stream_kind()})" in result["settings"]
    assert ("at most 3 sentences" in result["settings"]) == (against == "ctranslate2")
    projection = "output projection: MKL" if cpu_is_intel() else "output projection: oneDNN"
    assert projection in result["ours_kernels"] or not (packing_works() and mkl_packing_works())
    if against == "ctranslate2":  # apart from torch, batching itself; its logged GEMM
        assert "in a process of its own" in result["settings"]
        assert "its own batches of 3 sentences" in result["settings"]
        assert "SGEMM backend:" in result["ctranslate2_kernels"]
    if against == "hf":  # the same per-sentence length limit: the same lines
        assert result["greedy_identical_lines"] == 8


def test_bench_against_decodes_ours_by_the_stop_rule_given_and_theirs_by_its_own(
    checkpoint, multi30k_slice, capsys, monkeypatch
):
    rules, real = [], compare._Ours

    def spy(loaded, src_ids, cfg, precision):
        rules.append(cfg.stop)
        return real(loaded, src_ids, cfg, precision)

    monkeypatch.setattr(compare, "_Ours", spy)
    args = ["bench", "-m", str(checkpoint), "--against", "ctranslate2", "--sentences", "6"]
    args += ["--rounds", "1", "--json", "--data.root", str(multi30k_slice), "--stop", "beam"]
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert rules == ["beam"]
    assert "beam stop rule 'beam' for ours, ctranslate2's own for it" in result["settings"]


@pytest.mark.parametrize("precision,compute_type", [("bf16", "float32"), ("int8", "int8")])
def test_bench_against_ctranslate2_runs_each_engine_at_its_own_precision(
    checkpoint, multi30k_slice, precision, compute_type, capsys
):
    args = ["bench", "-m", str(checkpoint), "--against", "ctranslate2", "--sentences", "6"]
    args += ["--rounds", "1", "--json", "--data.root", str(multi30k_slice)]
    args += ["--decode-precision", precision, "--against-compute-type", compute_type]
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert f"ours {precision}" in result["settings"]
    assert f"ctranslate2 {compute_type}" in result["settings"]
    assert result["ours_kernels"].startswith(f"{precision} linear layers: ")
    gemm = "GEMM_S8 backend:" if compute_type == "int8" else "SGEMM backend:"
    assert gemm in result["ctranslate2_kernels"]
    assert result["beam5_ratio_ours_over_ctranslate2"] > 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--against-compute-type", "float16"], "--against-compute-type float16: this "),
        (["--decode-precision", "fp16"], "--decode-precision fp16: choose fp32, bf16 or int8"),
    ],
)
def test_a_precision_bench_against_cannot_run_is_one_line(
    checkpoint, multi30k_slice, extra, message, capsys
):
    args = ["bench", "-m", str(checkpoint), "--against", "ctranslate2"]
    args += ["--data.root", str(multi30k_slice), *extra]
    capsys.readouterr()
    assert main(args) == 1
    line = one_error_line(capsys)
    assert message in line
    if "float16: this" in message:  # names what this CPU can run instead
        assert "float32" in line and "int8" in line


def test_bench_against_hf_refuses_other_precisions_in_one_line(checkpoint, multi30k_slice, capsys):
    args = ["bench", "-m", str(checkpoint), "--against", "hf", "--decode-precision", "bf16"]
    args += ["--data.root", str(multi30k_slice)]
    capsys.readouterr()
    assert main(args) == 1
    assert "--against hf compares float32 only" in one_error_line(capsys)


def test_bench_against_compute_type_without_a_model_is_one_line(capsys):
    assert main(["bench", "--against-compute-type", "int8"]) == 1
    assert "--against-compute-type is for -m MODEL --against ctranslate2" in one_error_line(capsys)


@pytest.mark.parametrize("against", [[], ["-m", "MODEL", "--against", "hf"]])
def test_bench_against_inter_threads_elsewhere_is_one_line(checkpoint, against, capsys):
    args = [str(checkpoint) if a == "MODEL" else a for a in against]
    assert main(["bench", "--against-inter-threads", "1", *args]) == 1
    assert "--against-inter-threads is for -m MODEL --against ctranslate2" in one_error_line(capsys)


def test_bench_max_sentences_without_a_model_to_decode_is_one_line(capsys):
    assert main(["bench", "--max-sentences", "64"]) == 1
    assert "--max-sentences batches the decoding of --against" in one_error_line(capsys)


def test_the_ct2_file_script_translates_line_for_line_as_ctranslate2_without_torch(
    ct2_dir, loaded, sources, tmp_path
):
    from seq2seq.export.processes import SCRIPT

    lines = sources[:12]
    lines.insert(3, "")  # a blank line gives a blank line
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    run = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\ntry: runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e: code = e.code\n"
        "assert code == 0 and 'torch' not in sys.modules and 'seq2seq' not in sys.modules"
    )
    command = [sys.executable, "-c", run, str(SCRIPT), str(ct2_dir), str(tmp_path / "in.txt")]
    command += [str(tmp_path / "out.txt"), "--beam", "1", "--threads", "1"]
    command += ["--max-decoding-length", str(MAX_POSITIONS - 1)]
    command += ["--max-input-length", str(MAX_POSITIONS)]  # translate's truncation
    subprocess.run(command, check=True, cwd=tmp_path)
    out = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    assert len(out) == len(lines) and out[3] == ""
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", intra_threads=1)
    kept = lines[:3] + lines[4:]
    ids = compare.source_ids(loaded, kept)
    expected = compare.ct2_translate(
        translator, loaded.tokenizer, ids, [MAX_POSITIONS - 1] * len(ids), 1, 4096, exact=False
    )
    assert out[:3] + out[4:] == expected


def test_bench_whole_process_times_both_commands_start_up_included(
    checkpoint, multi30k_slice, capsys
):
    args = ["bench", "-m", str(checkpoint), "--against", "ctranslate2", "--whole-process"]
    args += ["--sentences", "4", "--rounds", "1", "--json", "--data.root", str(multi30k_slice)]
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["whole_process"] is True and "ct2_file.py" in result["settings"]
    assert f"inter_threads={result['threads']}, intra_threads=1" in result["settings"]
    for search in ("greedy", "beam5"):
        ours = result[f"{search}_ours_sentences_per_s"]
        theirs = result[f"{search}_ctranslate2_sentences_per_s"]
        assert ours > 0 and theirs > 0
        assert result[f"{search}_ratio_ours_over_ctranslate2"] == pytest.approx(
            ours / theirs, rel=0.05
        )
        assert 0 <= result[f"{search}_identical_lines"] <= 4
    assert result["one_line_ours_s"] > 0 and result["one_line_ctranslate2_s"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--against", "hf", "-m", "MODEL"], "--whole-process compares with --against ctranslate2"),
        ([], "--whole-process is for -m MODEL --against ctranslate2"),
        (
            ["-m", "MODEL", "--against", "ctranslate2", "--against-inter-threads", "64"],
            "--against-inter-threads 64: more batches side by side than the",
        ),
    ],
)
def test_whole_process_elsewhere_is_one_line(checkpoint, multi30k_slice, args, message, capsys):
    args = [str(checkpoint) if a == "MODEL" else a for a in args]
    capsys.readouterr()
    assert main(["bench", "--whole-process", "--data.root", str(multi30k_slice), *args]) == 1
    assert message in one_error_line(capsys)


# --- Separate vocabularies, an untied output projection with a bias ----------------------------
@pytest.fixture(scope="module")
def separate_checkpoint(multi30k_slice, tmp_path_factory) -> Path:
    from seq2seq.config import TokenizerConfig, preset
    from seq2seq.data.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("separate")
    en = read_gz_lines(multi30k_slice / "train.en.gz", 300)
    de = read_gz_lines(multi30k_slice / "train.de.gz", 300)
    tok = Tokenizer.train(en, de, TokenizerConfig(joint=False, vocab_size=200), out / "tok")
    cfg = preset(
        "tiny",
        src_vocab_size=tok.src_vocab_size,
        tgt_vocab_size=tok.tgt_vocab_size,
        max_positions=MAX_POSITIONS,
        tie_output=False,
        output_bias=True,
    )
    torch.manual_seed(2)
    model = Transformer(cfg)
    with torch.no_grad():
        model.generator.bias.normal_()  # a bias that matters
    return write_checkpoint(out / "separate.ckpt", model, tok.to_state(), DecodeConfig())


def test_separate_vocabularies_and_an_output_bias_export_exactly(
    separate_checkpoint, tmp_path, sources
):
    loaded = load_model(separate_checkpoint)
    assert not loaded.tokenizer.joint
    ids = compare.source_ids(loaded, sources[:40])
    cfg = DecodeConfig(beam=1, max_len_a=1.0, max_len_b=4)
    lim = limits(loaded, ids, cfg)
    ours = [loaded.tokenizer.decode_tgt(h[0].tokens) for h in decode_ids(loaded, ids, cfg)]
    assert export(separate_checkpoint, "hf", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "target_vocab.json").exists()
    model = transformers.MarianMTModel.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.MarianTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert compare.hf_translate(model, tok, ids, lim, 1, 4096) == ours
    assert export(separate_checkpoint, "ctranslate2", tmp_path / "ct2") == 0
    assert ct2_greedy(tmp_path / "ct2", loaded, ids) == ours


def test_a_minimum_length_is_kept_by_both_engines(separate_checkpoint, tmp_path, sources):
    """A model that wants EOS at once (a large EOS bias) writes exactly min_len tokens in
    ours, Marian's generate and CTranslate2."""
    ckpt = torch.load(separate_checkpoint, weights_only=True)
    ckpt["state_dict"]["model.generator.bias"][3] = 50.0
    eager = tmp_path / "eager.ckpt"
    torch.save(ckpt, eager)
    loaded = load_model(eager)
    cfg = DecodeConfig(beam=1, min_len=6, max_len_a=0.0, max_len_b=8)
    ids = compare.source_ids(loaded, sources[:20])
    lim = limits(loaded, ids, cfg)
    hyps = decode_ids(loaded, ids, cfg)
    assert {len(h[0].tokens) for h in hyps} == {6}
    ours = [loaded.tokenizer.decode_tgt(h[0].tokens) for h in hyps]
    assert export(eager, "hf", tmp_path / "hf") == 0
    model = transformers.MarianMTModel.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.MarianTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert compare.hf_translate(model, tok, ids, lim, 1, 4096, min_len=6) == ours
    assert export(eager, "ctranslate2", tmp_path / "ct2") == 0
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
    theirs = compare.ct2_translate(translator, loaded.tokenizer, ids, lim, 1, 4096, min_len=6)
    assert theirs == ours
