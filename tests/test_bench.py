"""`seq2seq bench` runs and reports its fields (never a speed: timings are not asserted)."""

import dataclasses
import json
import sys

import pytest
import torch
from conftest import write_checkpoint

from seq2seq.cli import main
from seq2seq.config import DecodeConfig, preset
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.kernels.onednn import onednn_works
from seq2seq.nn.transformer import Transformer


def bench_args(slice_dir, run_dir):
    return [
        "bench",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--max-tokens",
        "600",
        "--json",
        "--run-dir",
        str(run_dir),
        "--data.root",
        str(slice_dir),
        "--data.download",
        "null",
        "--data.tokenizer.vocab_size",
        "500",
    ]


def test_bench_json_reports_training_and_decoding_fields(multi30k_slice, tmp_path, capsys):
    run_dir = tmp_path / "bench"
    assert main(bench_args(multi30k_slice, run_dir)) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("train_tgt_tokens_per_s", "train_src_tgt_tokens_per_s", "train_peak_mem_mib"):
        assert result[key] > 0
    assert result["measured_steps"] == 2 and result["warmup_steps"] == 1
    assert result["vocab_size"] == 500 and result["shape"]["d_model"] == 32
    assert result["threads"] >= 1 and result["torch"] == torch.__version__
    assert result["cpu_linear"] == ("onednn" if onednn_works() else "torch")  # fp32, CPU

    tokenizer = Tokenizer.load(run_dir)  # the bench's own 500-piece vocabulary
    cfg = preset("tiny", src_vocab_size=500, tgt_vocab_size=500)
    checkpoint = write_checkpoint(
        tmp_path / "model.ckpt",
        Transformer(cfg),
        tokenizer.to_state(),
        DecodeConfig(max_len_a=0.5, max_len_b=2),
    )
    args = [*bench_args(multi30k_slice, run_dir), "-m", str(checkpoint), "--stop", "best"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode_sentences"] == 200 and result["stop"] == "best"
    for key in ("greedy_sentences_per_s", "beam5_sentences_per_s"):
        assert result[key] > 0
    for key in ("greedy_bleu", "beam5_bleu"):
        assert 0.0 <= result[key] <= 100.0


def test_comparison_batches_cover_every_row_once_within_the_target_token_budget():
    import numpy as np

    from seq2seq.training.bench import comparison_batches

    rng = np.random.default_rng(3)
    tgt, src = rng.integers(2, 40, 500), rng.integers(2, 40, 500)
    batches = comparison_batches(tgt, src, 300)
    rows = sorted(r for b in batches for r in b)
    assert rows == list(range(500))
    assert all(tgt[b].sum() <= 300 for b in batches)
    # Greedy cuts: adding the next row of the (target, source) order would exceed the budget.
    spans = sorted(
        (tuple(sorted(zip(tgt[b], src[b], strict=True))) for b in batches), key=lambda x: x[0]
    )
    for first, second in zip(spans, spans[1:], strict=False):
        assert sum(t for t, _ in first) + second[0][0] > 300


def test_a_budget_larger_than_the_corpus_takes_its_batches_again_and_compile_runs(
    multi30k_slice, tmp_path, capsys
):
    """The slice's 2,000 pairs hold about 58k target tokens in the bench's 500-piece vocabulary:
    a 20k budget cuts them into three batches, and the five steps asked for (two warm-up, three
    measured) take them again in order. With --compile the steps run through torch.compile."""
    args = bench_args(multi30k_slice, tmp_path / "bench")
    args[args.index("--max-tokens") + 1] = "20000"
    args[args.index("--steps") + 1] = "3"
    args[args.index("--warmup") + 1] = "2"
    assert main([*args, "--compile"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["measured_steps"] == 3 and result["compile"] is True
    assert result["cpu_linear"] == "torch"  # compiled: the layers' own forward
    assert 10_000 < result["mean_tgt_tokens_per_batch"] <= 20_000


def test_row_tokens_packs_the_benchmark_batches_and_counts_flops_per_sentence(
    multi30k_slice, tmp_path, capsys
):
    from seq2seq.data.batching import collate
    from seq2seq.training.bench import sentence_lengths

    assert main([*bench_args(multi30k_slice, tmp_path / "bench"), "--row-tokens", "128"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["row_tokens"] == 128 and result["measured_steps"] == 2
    assert result["train_tgt_tokens_per_s"] > 0
    items = [(0, [5, 6, 7, 3], [8, 9]), (1, [5, 3], [8, 9, 10, 11]), (2, [5, 6, 3], [8])]
    # attention FLOPs are counted over the longest sentence, not the row it shares
    assert sentence_lengths(collate(items, 64)) == sentence_lengths(collate(items)) == (4, 5)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-tokens", "0", "argument --max-tokens: must be at least 1, got 0"),
        ("--row-tokens", "-5", "argument --row-tokens: must be at least 1, got -5"),
        ("--steps", "0", "argument --steps: must be at least 1, got 0"),
        ("--warmup", "-1", "argument --warmup: must be at least 0, got -1"),
        ("--max-tokens", "many", "argument --max-tokens: invalid integer value: 'many'"),
    ],
)
def test_a_count_below_its_minimum_is_one_clear_line(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", option, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_cuda_bench_where_none_is_seen_is_one_line_before_any_data_work(
    tmp_path, capsys, monkeypatch
):
    """Not Lightning's MisconfigurationException traceback after the data is prepared."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "bench"
    args = ["bench", "--preset", "tiny", "--device", "cuda", "--run-dir", str(run)]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        "seq2seq bench: error: --device cuda: no CUDA device is available\n"
    )
    assert not run.exists()


def test_the_bench_times_the_training_step_of_train_with_the_recipes_settings(monkeypatch):
    """The bench runs TranslationModule.training_step under a Lightning Trainer: the recipe's
    label smoothing reaches the loss, its schedule the optimizer (lr after each measured
    step), and its gradient clipping the Trainer."""
    import seq2seq.training.module as module
    from seq2seq.config import OptimConfig, TrainerConfig
    from seq2seq.data.batching import collate
    from seq2seq.training.bench import _StepTimer, measure_training

    seen, lrs, clips = [], [], []
    real = module.batch_loss

    def recording(model, batch, epsilon):
        seen.append(epsilon)
        return real(model, batch, epsilon)

    def after_step(self, trainer, pl_module, outputs, batch, batch_idx):
        lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        clips.append(trainer.gradient_clip_val)

    monkeypatch.setattr(module, "batch_loss", recording)
    real_end = _StepTimer.on_train_batch_end
    monkeypatch.setattr(
        _StepTimer,
        "on_train_batch_end",
        lambda self, *a: (after_step(self, *a), real_end(self, *a)),
    )
    cfg = preset("tiny", src_vocab_size=30, tgt_vocab_size=30)
    batches = [collate([(0, [5, 6, 3], [7, 8]), (1, [9, 3], [10])]) for _ in range(3)]
    optim = OptimConfig(lr=1e-3, warmup_steps=1, schedule="linear", label_smoothing=0.3)
    trainer = TrainerConfig(max_steps=5, gradient_clip_val=0.5)
    result = measure_training(
        cfg, batches, torch.device("cpu"), "32-true", 1, False, optim, trainer
    )
    assert seen == [0.3, 0.3, 0.3] and result["measured_steps"] == 2
    assert clips == [0.5, 0.5, 0.5]
    # Each batch: src (2, 3) and tgt_in (2, 3) are 12 positions for 5 + 5 real tokens.
    assert result["padding_percent"] == pytest.approx(100 * 2 / 12, abs=0.05)
    # Linear decay from 1e-3 after one warm-up step to 0 at step 5; after update k the
    # optimizer holds the next update's lr, 1e-3 * (4 - k) / 4.
    assert lrs == pytest.approx([0.75e-3, 0.5e-3, 0.25e-3])


def test_a_recipe_and_a_preset_bench_the_presets_shape_on_the_recipes_data():
    from seq2seq.training.bench import bench_recipe

    recipe = bench_recipe("recipes/scale_wmt_like.yaml", "big", [])
    assert recipe.model == preset("big")
    assert [c.name for _, c in recipe.data.train_corpora()][0] == "europarl"
    assert bench_recipe("recipes/scale_wmt_like.yaml", None, []).model.d_model == 512


# --- Training beside HF's MarianMTModel (--against hf without -m) -----------------------------
def test_bench_against_hf_trains_a_marian_of_the_same_shape_on_the_same_batches(
    multi30k_slice, tmp_path, capsys
):
    pytest.importorskip("transformers")
    assert main([*bench_args(multi30k_slice, tmp_path / "bench"), "--against", "hf"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hf_params"] == result["params"]  # the same architecture, parameter for parameter
    assert result["measured_steps"] == 2
    for key in ("hf_median_step_s", "hf_train_tgt_tokens_per_s", "train_ratio_ours_over_hf"):
        assert result[key] > 0


def test_the_hf_training_peer_learns_from_our_batches(multi30k_slice, tmp_path):
    pytest.importorskip("transformers")
    from seq2seq.config import OptimConfig
    from seq2seq.export.peer import HfTrainingPeer
    from seq2seq.training.bench import bench_recipe, training_batches

    overrides = ["--data.root", str(multi30k_slice), "--data.download", "null"]
    recipe = bench_recipe(None, "tiny", [*overrides, "--data.tokenizer.vocab_size", "500"])
    batches, tok = training_batches(recipe, str(tmp_path / "bench"), 300, 1)
    cfg = dataclasses.replace(recipe.model, src_vocab_size=500, tgt_vocab_size=500, dropout=0.0)
    peer = HfTrainingPeer(cfg, OptimConfig(label_smoothing=0.0), lr=3e-3, clip=1.0)
    batch = batches[0]

    def loss() -> float:
        peer.model.eval()
        with torch.no_grad():
            logits = peer.model(input_ids=batch.src, decoder_input_ids=batch.tgt_in).logits
        peer.model.train()
        real = batch.tgt_out != 0
        return float(torch.nn.functional.cross_entropy(logits[real], batch.tgt_out[real]))

    before = loss()
    for _ in range(5):
        assert peer.step(batch) > 0
    assert loss() < before - 0.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--against", "ctranslate2"], "--against ctranslate2 compares decoding: give -m MODEL"),
        (["--against", "hf", "--row-tokens", "64"], "leave out --row-tokens"),
        (["--against", "hf", "--precision", "16-mixed"], "not --precision 16-mixed"),
    ],
)
def test_what_training_against_hf_cannot_do_is_one_clear_line(
    multi30k_slice, tmp_path, extra, message, capsys
):
    assert main([*bench_args(multi30k_slice, tmp_path / "bench"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_training_against_hf_without_the_export_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    assert main(["bench", "--preset", "tiny", "--against", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install -e .[export]" in err and len(err.splitlines()) == 1


def test_the_decode_profile_reports_the_matmul_share_and_the_top_operators(
    multi30k_slice, checkpoint, capsys
):
    from seq2seq.inference.profile import MATMUL_OPS

    args = ["bench", "-m", str(checkpoint), "--profile", "--sentences", "12", "--json"]
    assert main([*args, "--data.root", str(multi30k_slice), "--data.download", "null"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile_sentences"] == 12 and result["profile_threads"] == 1
    for name in ("greedy", "beam5"):
        ops = result[f"{name}_top_ops"]
        shares = [share for _, share in ops]
        assert len(ops) == 10 and shares == sorted(shares, reverse=True) and sum(shares) <= 1.001
        listed = sum(share for op, share in ops if op in MATMUL_OPS)
        assert 0.0 < listed <= result[f"{name}_matmul_share"] + 1e-3 < 1.0
        assert result[f"{name}_seconds"] > 0


def test_the_decode_profile_decodes_in_the_batches_and_stopping_rule_it_is_given(
    multi30k_slice, checkpoint, capsys, monkeypatch
):
    from seq2seq.inference.translator import Translator

    seen = []
    decode_batch = Translator.decode_batch

    def spy(self, src, cfg, scores=True):
        seen.append((src.size(0), cfg.beam, cfg.stop))
        return decode_batch(self, src, cfg, scores)

    monkeypatch.setattr(Translator, "decode_batch", spy)
    args = ["bench", "-m", str(checkpoint), "--profile", "--sentences", "6", "--json"]
    args += ["--max-sentences", "1", "--stop", "best"]
    assert main([*args, "--data.root", str(multi30k_slice), "--data.download", "null"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile_max_sentences"] == 1 and result["profile_stop"] == "best"
    assert result["profile_sentences"] == 6 and result["profile_batches"] == 6
    # Each search: a warm-up batch, then the 6 sentences one at a time.
    assert [rows for rows, _, _ in seen] == [1] * 14
    assert {(beam, stop) for _, beam, stop in seen} == {(1, "best"), (5, "best")}


def test_the_decode_profile_samples_evenly_where_there_are_more_batches_than_it_keeps(
    multi30k_slice, checkpoint, capsys, monkeypatch
):
    """torch.profiler's records grow with the batches (the 1,000 test sentences one at a time
    outgrew 24 GB): a profile keeps every k-th batch, at most MAX_BATCHES."""
    import seq2seq.inference.profile as profile

    monkeypatch.setattr(profile, "MAX_BATCHES", 2)
    args = ["bench", "-m", str(checkpoint), "--profile", "--sentences", "6", "--json"]
    args += ["--max-sentences", "1", "--data.root", str(multi30k_slice), "--data.download", "null"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile_batches"] == 2 and result["profile_sentences"] == 2
    assert 0.0 < result["greedy_matmul_share"] < 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile"], "--profile needs -m MODEL"),
        (["--profile", "-m", "x.ckpt", "--against", "ctranslate2"], "drop --against"),
        # Options of the comparison with CTranslate2 are refused, not silently ignored.
        (
            ["--profile", "-m", "x.ckpt", "--against-compute-type", "int8"],
            "--against-compute-type is for -m MODEL --against ctranslate2",
        ),
        (
            ["--profile", "-m", "x.ckpt", "--against-inter-threads", "1"],
            "--against-inter-threads is for -m MODEL --against ctranslate2",
        ),
        (
            ["--profile", "-m", "x.ckpt", "--whole-process"],
            "--whole-process is for -m MODEL --against ctranslate2",
        ),
        (["--profile", "-m", "x.ckpt", "--rounds", "2"], "--rounds is for -m MODEL --against"),
        # Options of a decoding comparison or profile, given to the training benchmark.
        (
            ["--preset", "tiny", "--sentences", "5"],
            "--sentences is for -m MODEL with --against or --profile",
        ),
        (
            ["--preset", "tiny", "-m", "x.ckpt", "--rounds", "2"],
            "--rounds is for -m MODEL --against",
        ),
        (["--preset", "tiny", "--stop", "best"], "--stop sets how -m MODEL decodes: give -m MODEL"),
        # The training step's options, where no training is timed.
        (
            ["--profile", "-m", "x.ckpt", "--steps", "5"],
            "--steps sets the training step's timing, which this bench skips",
        ),
        (
            ["-m", "x.ckpt", "--against", "ctranslate2", "--compile"],
            "--compile sets the training step's timing, which this bench skips",
        ),
        (
            ["-m", "x.ckpt", "--against", "hf", "--max-tokens", "512"],
            "--max-tokens sets the training step's timing, which this bench skips",
        ),
        (
            ["--preset", "tiny", "--decode-precision", "int8"],
            "--decode-precision sets how -m MODEL decodes: give -m MODEL",
        ),
    ],
)
def test_bench_options_where_they_do_not_apply_are_one_clear_line(args, message, capsys):
    assert main(["bench", *args]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_mistyped_override_names_the_default_benchmark_not_a_preset_never_given(capsys):
    assert main(["bench", "--data.rooot", "D", "--json"]) == 1
    assert capsys.readouterr().err.strip() == (
        "seq2seq bench: error: the default benchmark (preset small): unrecognized arguments: "
        "--data.rooot D"
    )
