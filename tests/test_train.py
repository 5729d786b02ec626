"""`seq2seq train`: a real (tiny) run on a Multi30k slice, exact resume, DDP, fine-tuning."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from seq2seq.cli import main
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.inference.checkpoint import load_model, read_checkpoint
from seq2seq.recipe import load_recipe
from seq2seq.training.train import RunDirError, train

RECIPE = str(Path(__file__).parents[1] / "recipes" / "multi30k_en_de.yaml")


def tiny_recipe(data_root: Path, cache: Path, *extra: str):
    """The Multi30k recipe shrunk to seconds: tiny model, 1000 pairs, 400 pieces."""
    return load_recipe(RECIPE, tiny_overrides(data_root, cache, *extra))


def tiny_overrides(data_root: Path, cache: Path, *extra: str) -> list[str]:
    return [
        *("--data.root", str(data_root), "--data.download", "null"),
        *("--data.cache_dir", str(cache)),
        *("--data.train.max_pairs", "1000", "--data.valid.max_pairs", "60"),
        *("--data.test.max_pairs", "40"),
        *("--data.tokenizer.vocab_size", "400", "--data.max_tokens", "1200"),
        *("--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64"),
        *(
            "--model.n_encoder_layers",
            "1",
            "--model.n_decoder_layers",
            "1",
            "--model.dropout",
            "0.1",
        ),
        *("--optim.lr", "0.005", "--optim.warmup_steps", "20"),
        *("--trainer.max_steps", "60", "--trainer.max_time_minutes", "null"),
        *("--trainer.val_check_interval", "20", "--trainer.log_every_n_steps", "5"),
        *("--trainer.save_top_k", "2", "--trainer.average_last", "2", "--trainer.threads", "1"),
        *("--decode.beam", "2", "--decode.max_len_a", "1.0", "--decode.max_len_b", "5"),
        *extra,
    ]


def parameters(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path)["state_dict"].items()}


class CrashAt(Callback):
    """Simulate a crash (as kill -9 would leave things: no clean shutdown) after `step` updates."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemError(f"simulated crash at step {self.step}")


class SaveRankParameters(Callback):
    """Each DDP rank writes its parameters at the end (module level: ddp_spawn pickles it)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.model.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


class RecordValidationRows(Callback):
    """Each DDP rank writes the validation rows it decoded (module level: ddp_spawn pickles it)."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self.rows += batch.index.tolist()

    def on_validation_end(self, trainer, pl_module):
        path = self.folder / f"val_rows{trainer.global_rank}.json"
        path.write_text(json.dumps(self.rows))


@pytest.fixture(scope="module")
def trained_run(multi30k_slice, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    results = train(tiny_recipe(multi30k_slice, run / "cache"), run)
    return run, results


def test_a_tiny_run_trains_its_loss_falls_and_it_writes_checkpoints_and_results(trained_run):
    run, results = trained_run
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("step*-bleu*.ckpt"))) == 2
    assert (run / "checkpoints" / "averaged.ckpt").is_file()
    assert (run / "recipe.yaml").is_file() and (run / "spm.model").is_file()
    assert (run / "curves.png").stat().st_size > 1000
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == results
    assert results["steps"] == 60
    assert 0.0 < results["first_update_s"] < results["wall_time_s"]
    for split in ("valid", "test"):
        assert 0.0 <= results[split]["bleu"] <= 100.0
        assert results[split]["bleu_signature"].startswith("nrefs:1|")
        assert "chrf" in results[split]
    from seq2seq.training.plot import read_metrics

    losses = [value for _, value in read_metrics(run)["train_loss"]]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 1.0


def test_the_final_update_is_validated_when_max_steps_is_off_the_interval(multi30k_slice, tmp_path):
    from seq2seq.training.plot import read_metrics

    extra = ("--trainer.max_steps", "25", "--trainer.average_last", "0")
    results = train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), tmp_path / "run")
    assert results["steps"] == 25
    assert len(read_metrics(tmp_path / "run")["val_bleu"]) == 2  # after updates 20 and 25
    kept = sorted(path.name[:11] for path in (tmp_path / "run" / "checkpoints").glob("step*"))
    assert kept == ["step0000020", "step0000025"]


def test_checkpoints_are_self_contained_and_translate(trained_run):
    run, _ = trained_run
    loaded = load_model(run / "checkpoints" / "last.ckpt")
    assert loaded.tokenizer.src_vocab_size == loaded.model.cfg.src_vocab_size == 400
    assert loaded.decode.beam == 2


def test_a_finished_run_is_not_overwritten(trained_run, multi30k_slice):
    run, _ = trained_run
    with pytest.raises(RunDirError, match="finished"):
        train(tiny_recipe(multi30k_slice, run / "cache"), run)


def test_resuming_with_a_different_model_is_refused(multi30k_slice, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", "--trainer.max_steps", "2")
    from seq2seq.recipe import dump_recipe

    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    other = tiny_recipe(multi30k_slice, tmp_path / "cache", "--model.d_ff", "128")
    with pytest.raises(RunDirError, match="'model' section differs"):
        train(other, run)


@pytest.mark.parametrize(
    ("crash_at", "val_every"),
    [(27, 25), (18, 16)],
    ids=["mid-epoch", "between-epochs"],
)
def test_an_interrupted_then_resumed_run_ends_with_the_same_parameters(
    multi30k_slice, tmp_path, crash_at, val_every
):
    extra = ("--trainer.max_steps", "40", "--trainer.val_check_interval", str(val_every))
    straight = tmp_path / "straight"
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), straight)

    resumed = crashed_run(multi30k_slice, tmp_path, crash_at, *extra)
    saved = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == val_every
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), resumed)
    assert not [w for w in caught if "resuming from a checkpoint" in str(w.message)]

    a = parameters(straight / "checkpoints" / "last.ckpt")
    b = parameters(resumed / "checkpoints" / "last.ckpt")
    assert read_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 40
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert_same_history(straight, resumed)


def assert_same_history(straight: Path, resumed: Path) -> None:
    """The resumed run's joined logs hold the uninterrupted run's history: the same steps
    for every metric, and the same values for those that do not measure time."""
    from seq2seq.training.plot import read_metrics

    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(a) == sorted(b)
    for key in a:
        assert [step for step, _ in b[key]] == [step for step, _ in a[key]], key
    for key in ("val_bleu", "val_loss", "lr"):
        assert b[key] == a[key], key


def test_init_from_loads_the_weights_and_the_tokenizer(trained_run, multi30k_slice, tmp_path):
    run, _ = trained_run
    source = run / "checkpoints" / "last.ckpt"
    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        "--trainer.max_steps",
        "1",
        "--data.tokenizer.vocab_size",
        "300",  # ignored: fine-tuning keeps the model's vocabulary
    )
    import seq2seq.training.train as train_module

    seen = {}
    original = train_module.build_trainer

    def spying_trainer(recipe, run_dir):
        trainer = original(recipe, run_dir)

        class Spy(Callback):
            def on_train_start(self, trainer, pl_module):
                seen["weights"] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
                seen["step"] = trainer.global_step

        trainer.callbacks.append(Spy())
        return trainer

    train_module.build_trainer = spying_trainer
    try:
        train(recipe, tmp_path / "finetune", init_from=str(source))
    finally:
        train_module.build_trainer = original
    trained = load_model(source).model.state_dict()
    assert seen["step"] == 0  # fresh optimizer and schedule
    for name, tensor in trained.items():
        torch.testing.assert_close(seen["weights"][name], tensor, rtol=0, atol=0)
    assert (tmp_path / "finetune" / "spm.model").read_bytes() == (run / "spm.model").read_bytes()


class Resumed(Exception):
    """Raised where a resume would first write (`stop_when_it_resumes`)."""


def stop_when_it_resumes(monkeypatch) -> None:
    """Make `train` stop with Resumed once it resumes, before it writes anything."""
    import seq2seq.training.train as train_module

    def stop(self, step):
        raise Resumed

    monkeypatch.setattr(train_module.RunDir, "keep_metrics_for_resume", stop)


def test_a_resume_says_so_and_that_init_from_is_not_used(
    trained_run, multi30k_slice, monkeypatch, caplog
):
    """Running the same command again resumes, --init-from on it too; the log says which."""
    import seq2seq.training.train as train_module

    run, results = trained_run
    stop_when_it_resumes(monkeypatch)
    recipe = tiny_recipe(multi30k_slice, run / "cache", "--trainer.max_steps", "61")
    source = run / "checkpoints" / "averaged.ckpt"
    with caplog.at_level(logging.INFO, logger=train_module.__name__), pytest.raises(Resumed):
        train(recipe, run, init_from=str(source))
    said = [r.getMessage() for r in caplog.records if r.name == train_module.__name__]
    assert said == [
        f"resuming {run} from {run / 'checkpoints' / 'last.ckpt'} (update {results['steps']}); "
        f"--init-from {source} is not used (it starts a new run)"
    ]


def test_two_process_ddp_on_cpu_trains_and_ranks_agree(multi30k_slice, tmp_path):
    import seq2seq.training.train as train_module

    original = train_module.build_trainer

    def recording_trainer(recipe, run_dir):
        trainer = original(recipe, run_dir)
        trainer.callbacks += [SaveRankParameters(tmp_path), RecordValidationRows(tmp_path)]
        return trainer

    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "6",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_spawn",
        "--trainer.average_last",
        "0",
    )
    train_module.build_trainer = recording_trainer
    try:
        train(recipe, tmp_path / "ddp")
    finally:
        train_module.build_trainer = original
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["steps"] == 6
    # Validation: each rank decoded its own share of the 60 pairs, and BLEU was scored on
    # the gathered whole (on a partial set it would not be logged at all).
    shares = [set(json.loads((tmp_path / f"val_rows{r}.json").read_text())) for r in (0, 1)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(60))
    with open(tmp_path / "ddp" / "logs" / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f) if row.get("val_bleu")] == ["5"]


def test_a_run_dir_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    assert main(["train", RECIPE, "--run-dir", str(taken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"seq2seq train: error: --run-dir {taken}: exists and is not a folder"
    assert taken.read_text() == "mine\n"


def test_a_gpu_asked_for_where_none_is_seen_fails_before_any_data_work(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    args = ["train", RECIPE, "--run-dir", str(run), "--trainer.accelerator", "gpu"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.accelerator=gpu" in err and "no CUDA GPU" in err
    assert not run.exists()  # nothing prepared, no tokenizer trained


def test_train_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["train", RECIPE, "--init-from", str(bad), "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.ckpt" in err and "not a readable checkpoint" in err


def test_the_logged_training_loss_is_the_token_weighted_mean_since_the_last_log(
    multi30k_slice, tmp_path, monkeypatch
):
    """Each training update's loss is replaced by its number (1, 2, ...), with gradient zero:
    the train_loss logged every 5 updates must be the mean over those 5 updates, weighted by
    their target tokens, not the last batch's value."""
    import seq2seq.training.module as module_file
    from seq2seq.training.plot import read_metrics

    real_loss = module_file.batch_loss
    tokens = []

    def numbered(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not validation
            tokens.append(out.n_tokens)
            out.loss = out.loss * 0 + len(tokens)
        return out

    monkeypatch.setattr(module_file, "batch_loss", numbered)
    extra = ("--trainer.max_steps", "10", "--trainer.average_last", "0")
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), tmp_path / "run")
    logged = read_metrics(tmp_path / "run")["train_loss"]
    expected = [
        sum(k * n for k, n in enumerate(tokens[start : start + 5], start + 1))
        / sum(tokens[start : start + 5])
        for start in (0, 5)
    ]
    assert len(tokens) == 10 and len(set(tokens)) > 1  # batches of different sizes
    assert [step for step, _ in logged] == [4, 9]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)


def test_a_nan_loss_stops_with_one_clear_line_and_keeps_the_last_good_checkpoint(
    multi30k_slice, tmp_path, monkeypatch, capsys
):
    import seq2seq.training.module as module_file

    real_loss = module_file.batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 25:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(module_file, "batch_loss", poisoned)
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", "--trainer.val_check_interval", "25")
    monkeypatch.setattr("seq2seq.recipe.load_recipe", lambda *a, **k: recipe)
    run = tmp_path / "nan"
    assert main(["train", RECIPE, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last_line = err.splitlines()[-1]
    assert last_line.startswith("seq2seq train: error: the loss became NaN or infinite at step 25")
    assert "last good checkpoint" in last_line
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 25
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (run / "results.json").exists()


def test_progress_bar_counts_updates_to_max_steps_on_stderr(multi30k_slice, tmp_path, capsys):
    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "10",
    )
    train(recipe, tmp_path / "bar")
    captured = capsys.readouterr()
    assert "20/20" in captured.err and "train_loss=" in captured.err and "lr=" in captured.err
    assert "20/20" not in captured.out
    # Both validations (steps 10 and 20) count their batches to the total, not only the first.
    done = re.findall(r"validate: 100%\|[^|]*\| (\d+)/(\d+)", captured.err)
    assert len(done) == 2 and all(n == total for n, total in done)


def test_a_time_limited_run_shows_steps_of_max_steps_and_the_time_left(
    multi30k_slice, tmp_path, capsys
):
    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        "--trainer.max_steps",
        "20",
        "--trainer.max_time_minutes",
        "30",
    )
    train(recipe, tmp_path / "timed")
    err = capsys.readouterr().err
    assert "time_left=0:2" in err  # under 30 minutes left, and counting down
    assert "20/20" in err  # and the step budget, whichever ends the run first


def test_out_of_memory_suggests_a_smaller_max_tokens(multi30k_slice, tmp_path, monkeypatch, capsys):
    import seq2seq.training.module as module_file

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module_file, "batch_loss", exhausted)
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache")
    monkeypatch.setattr("seq2seq.recipe.load_recipe", lambda *a, **k: recipe)
    assert main(["train", RECIPE, "--run-dir", str(tmp_path / "oom")]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "out of memory with data.max_tokens=1200" in last_line
    assert "--data.max_tokens" in last_line


def test_bf16_mixed_precision_trains_on_cpu_with_gradient_clipping(multi30k_slice, tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer: the fused
    Adam must step aside when clipping is on."""
    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.gradient_clip_val",
        "1.0",
        "--trainer.max_steps",
        "10",
        "--trainer.val_check_interval",
        "10",
        "--trainer.average_last",
        "0",
    )
    results = train(recipe, tmp_path / "bf16")
    assert results["steps"] == 10
    assert (tmp_path / "bf16" / "checkpoints" / "last.ckpt").is_file()


def test_a_rank_with_a_finite_loss_stops_when_another_rank_saw_nan():
    """The NaN decision is collective ('any rank'): no rank is left waiting in an all-reduce."""
    from types import SimpleNamespace

    from seq2seq.config import DecodeConfig, OptimConfig, preset
    from seq2seq.training.module import NonFiniteLossError, TranslationModule

    module = TranslationModule(
        preset("tiny", src_vocab_size=20, tgt_vocab_size=20), OptimConfig(), DecodeConfig(), {}
    )
    asked = []

    def any_rank(decision, all=True):
        asked.append((decision, all))
        return True  # the other rank's loss was NaN

    module._trainer = SimpleNamespace(
        world_size=2,
        log_every_n_steps=1,
        global_step=3,
        strategy=SimpleNamespace(reduce_boolean_decision=any_rank),
    )
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        module._note_nonfinite(torch.tensor(1.5))  # this rank's loss is finite
    assert asked == [(False, False)]


@pytest.mark.parametrize("lowercase", [False, True])
def test_validation_picks_a_lowercasing_model_by_lowercased_bleu(
    slice_lines, tmp_path, monkeypatch, lowercase
):
    from seq2seq.config import DecodeConfig, OptimConfig, TokenizerConfig, preset
    from seq2seq.data.tokenizer import Tokenizer
    from seq2seq.training.module import TranslationModule

    lines = slice_lines[0][:500], slice_lines[1][:500]
    cfg = TokenizerConfig(vocab_size=500, lowercase=lowercase)
    tokenizer = Tokenizer.train(iter(lines[0]), iter(lines[1]), cfg, tmp_path)
    module = TranslationModule(
        preset("tiny", src_vocab_size=500, tgt_vocab_size=500), OptimConfig(), DecodeConfig(), {}
    )
    module.tokenizer, module.valid_refs = tokenizer, lines[1][:40]
    hyps = dict(enumerate(tokenizer.encode_tgt([ref.lower() for ref in lines[1][:40]])))
    monkeypatch.setattr(module, "_gather_validation", lambda: ([1.0, 1.0, 1.0], hyps))
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.setdefault(name, value))
    module.on_validation_epoch_end()
    assert module.last_val_scores["bleu_lc"] > 99.0  # the lowercase hypotheses are the references
    assert module.last_val_scores["bleu"] < 60.0  # German capitalizes its nouns
    chosen = "bleu_lc" if lowercase else "bleu"
    assert logged["val_bleu"] == module.last_val_scores[chosen]


def test_a_training_pair_longer_than_max_positions_fails_before_training(multi30k_slice, tmp_path):
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", "--model.max_positions", "12")
    with pytest.raises(ValueError, match=r"data.train: .* more than model.max_positions=12; set"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_validation_line_longer_than_max_positions_is_named_before_training(
    multi30k_slice, tmp_path
):
    import gzip
    import re

    extra = ("--model.max_positions", "12", "--data.clean.max_length", "11")
    with pytest.raises(ValueError) as err:
        train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), tmp_path / "run")
    found = re.fullmatch(
        r"data.valid \((.+), (.+)\) line (\d+): its (source|target) has (\d+) tokens, "
        r"more than model.max_positions=12; raise model.max_positions or remove that line",
        str(err.value),
    )
    assert found, str(err.value)
    src_file, tgt_file, line, side, tokens = found.groups()
    from seq2seq.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tmp_path / "run")
    path = multi30k_slice / (src_file if side == "source" else tgt_file)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read().split("\n")[int(line) - 1]
    seen = (  # what the model sees: pieces + EOS, or BOS + pieces
        len(tokenizer.encode_src([text])[0])
        if side == "source"
        else len(tokenizer.encode_tgt([text])[0]) + 1
    )
    assert seen == int(tokens) > 12


def test_overwrite_starts_afresh_even_with_another_vocabulary(multi30k_slice, tmp_path):
    run = tmp_path / "run"
    short = ("--trainer.average_last", "0", "--trainer.val_check_interval", "3")
    # On a folder holding no finished run, --overwrite simply starts (it used to crash).
    train(
        tiny_recipe(multi30k_slice, run / "cache", *short, "--trainer.max_steps", "6"),
        run,
        overwrite=True,
    )
    recipe = tiny_recipe(
        multi30k_slice,
        run / "cache",
        *short,
        "--trainer.max_steps",
        "4",
        "--data.tokenizer.vocab_size",
        "300",
    )
    with pytest.raises(RunDirError, match="finished"):
        train(recipe, run)
    mine = run / "notes.txt"
    mine.write_text("not the run's")
    with pytest.raises(ValueError, match="notes.txt"):  # a file no run writes: refused
        train(recipe, run, overwrite=True)
    assert mine.read_text() == "not the run's" and (run / "results.json").exists()
    mine.unlink()
    assert train(recipe, run, overwrite=True)["steps"] == 4
    assert Tokenizer.load(run).src_vocab_size == 300  # not the first run's 400 pieces
    steps = [int(p.name[4:11]) for p in (run / "checkpoints").glob("step*.ckpt")]
    assert steps and max(steps) == 4  # the first run's step-6 checkpoint is gone
    with open(run / "logs" / "metrics.csv") as f:
        assert max(int(row["step"]) for row in csv.DictReader(f)) <= 4


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_the_train_command_under_ddp_runs_two_processes_and_prints_one_result(
    multi30k_slice, tmp_path, launcher
):
    """`--trainer.devices 2` on a CPU. Lightning starts rank 1 by running the same command
    again once rank 0 has prepared the run (with --overwrite, rank 1 must not remove what rank
    0 prepared); torchrun starts both ranks together. Only rank 0 prints."""
    run = tmp_path / "run"
    run.mkdir()
    if launcher == "lightning":
        (run / "results.json").write_text("{}")  # a finished run: --overwrite is needed
    overrides = tiny_overrides(
        multi30k_slice,
        run / "cache",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.average_last",
        "0",
    )
    command = [sys.executable, "-m", "seq2seq", "train", RECIPE, *overrides]
    command += ["--trainer.devices", "2", "--run-dir", str(run)]
    if launcher == "lightning":
        command.append("--overwrite")
    else:  # torchrun starts the ranks together; --overwrite is refused there (test below)
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr
    assert "sync_dist=True" not in done.stderr  # validation metrics are logged as synced
    assert json.loads(done.stdout)["steps"] == 6  # one JSON object: rank 1 prints nothing
    assert (run / "spm.model").exists() and (run / "recipe.yaml").exists()


@pytest.mark.parametrize(
    "env", [{"RANK": "0", "WORLD_SIZE": "2"}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}]
)
def test_overwrite_is_refused_when_a_launcher_started_all_ranks_together(
    multi30k_slice, tmp_path, monkeypatch, env
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(RunDirError, match="started together"):
        train(tiny_recipe(multi30k_slice, run / "cache"), run, overwrite=True)
    assert (run / "results.json").exists()  # nothing was removed


def test_keep_last_keeps_the_last_validations_and_average_last_averages_them(
    multi30k_slice, tmp_path
):
    extra = ("--trainer.val_check_interval", "10", "--trainer.save_top_k", "1")
    extra += ("--trainer.keep_last", "3", "--trainer.average_last", "3")
    results = train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    recent = sorted(path.name for path in folder.glob("recent-step*.ckpt"))
    assert recent == [
        "recent-step0000040.ckpt",
        "recent-step0000050.ckpt",
        "recent-step0000060.ckpt",
    ]
    assert results["checkpoint"] == str(folder / "averaged.ckpt")
    averaged = parameters(folder / "averaged.ckpt")
    mean = {
        name: sum(parameters(folder / n)[name].double() for n in recent) / 3
        for name in averaged
        if averaged[name].is_floating_point()
    }
    for name, value in mean.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-6, atol=1e-7)


def crashed_run(multi30k_slice, tmp_path, crash_at: int, *extra: str) -> Path:
    """A run killed (no clean shutdown) after `crash_at` updates."""
    import seq2seq.training.train as train_module

    run, original = tmp_path / "run", train_module.build_trainer

    def crashing_trainer(recipe, run_dir):
        trainer = original(recipe, run_dir)
        trainer.callbacks.append(CrashAt(crash_at))
        return trainer

    train_module.build_trainer = crashing_trainer
    try:
        with pytest.raises(SystemError, match="simulated crash"):
            train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), run)
    finally:
        train_module.build_trainer = original
    return run


def test_a_truncated_last_checkpoint_resumes_from_the_newest_valid_one_with_a_warning(
    multi30k_slice, tmp_path, caplog
):
    extra = ("--trainer.max_steps", "40", "--trainer.val_check_interval", "10")
    extra += ("--trainer.save_top_k", "5")
    run = crashed_run(multi30k_slice, tmp_path, 33, *extra)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # as a full disk leaves it
    with caplog.at_level("WARNING"):
        assert train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), run)["steps"] == 40
    warned = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warned) == 1 and "last.ckpt" in warned[0] and "step0000030" in warned[0]


def test_resuming_from_a_last_checkpoint_with_a_pickle_payload_is_one_line_and_runs_nothing(
    multi30k_slice, tmp_path, capsys
):
    from test_faults import Payload

    extra = ("--trainer.max_steps", "40", "--trainer.val_check_interval", "10")
    run = crashed_run(multi30k_slice, tmp_path, 15, *extra)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["payload"] = Payload(tmp_path / "pwned")
    torch.save(ckpt, last)
    argv = ["train", RECIPE, *tiny_overrides(multi30k_slice, tmp_path / "cache", *extra)]
    capsys.readouterr()  # the crashed run's output
    assert main([*argv, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.ckpt: refused" in err
    assert not (tmp_path / "pwned").exists()


class InterruptAt(Callback):
    """Ctrl-C (KeyboardInterrupt) after `step` updates, as the signal would raise it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_says_how_to_resume_and_exits_130(multi30k_slice, tmp_path, capsys, monkeypatch):
    import seq2seq.training.train as train_module

    original = train_module.build_trainer

    def interrupted_trainer(recipe, run_dir):
        trainer = original(recipe, run_dir)
        trainer.callbacks.append(InterruptAt(7))
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", interrupted_trainer)
    argv = ["train", RECIPE, *tiny_overrides(multi30k_slice, tmp_path / "cache")]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("seq2seq train: interrupted: run the same command to resume")


def test_save_every_minutes_saves_last_between_validations_and_resumes_exactly(
    multi30k_slice, tmp_path
):
    extra = ("--trainer.max_steps", "40", "--trainer.val_check_interval", "20")
    timed = (*extra, "--trainer.save_every_minutes", "1e-9")  # at every update
    run = crashed_run(multi30k_slice, tmp_path, 33, *timed)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 33
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # one last.ckpt, overwritten
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *timed), run)
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    straight = tmp_path / "straight"
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), straight)
    a = parameters(straight / "checkpoints" / "last.ckpt")
    b = parameters(run / "checkpoints" / "last.ckpt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert_same_history(straight, run)


def test_a_kill_just_after_any_checkpoint_loses_no_logged_row(
    multi30k_slice, tmp_path, monkeypatch
):
    """At the moment each checkpoint file is complete, the log on disk already holds every
    row a resume from it keeps (those below its step), validation scores included: timed
    saves at every update that allows one, validations every 10, a row every 3 updates."""
    from seq2seq.training import train as train_module
    from seq2seq.training.plot import _rows

    snapshots: list[tuple[int, list]] = []
    original = train_module.AtomicCheckpointIO.save_checkpoint
    metrics = tmp_path / "run" / "logs" / "metrics.csv"

    def save_and_snapshot(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        rows = _rows(metrics) if metrics.is_file() else []
        snapshots.append((checkpoint["global_step"], rows))

    monkeypatch.setattr(train_module.AtomicCheckpointIO, "save_checkpoint", save_and_snapshot)
    extra = ("--trainer.max_steps", "25", "--trainer.val_check_interval", "10")
    extra += ("--trainer.save_every_minutes", "1e-9", "--trainer.log_every_n_steps", "3")
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), tmp_path / "run")
    final = _rows(metrics)
    timed = {step for step in range(1, 25) if step % 3 and step % 10}
    assert {step for step, _ in snapshots} == timed | {10, 20, 25}
    for step, rows in snapshots:
        kept = [row for row in final if row[0] < step]
        assert [row for row in rows if row[0] < step] == kept, step
    validated = {row[0] for row in final if row[1] == "val_bleu"}
    assert validated == {9, 19, 24}


def test_a_finished_run_trains_further_with_a_larger_max_steps_and_rescores(
    multi30k_slice, tmp_path
):
    from seq2seq.training.plot import read_metrics

    run = tmp_path / "run"
    short = ("--trainer.val_check_interval", "10", "--trainer.average_last", "0")
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *short, "--trainer.max_steps", "20"), run)
    for steps in ("20", "15"):  # not beyond the finished step: refused as before
        with pytest.raises(RunDirError, match="finished"):
            train(
                tiny_recipe(
                    multi30k_slice, tmp_path / "cache", *short, "--trainer.max_steps", steps
                ),
                run,
            )
    longer = tiny_recipe(multi30k_slice, tmp_path / "cache", *short, "--trainer.max_steps", "30")
    results = train(longer, run)
    assert results["steps"] == 30
    assert json.loads((run / "results.json").read_text())["steps"] == 30
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 30
    assert [step for step, _ in read_metrics(run)["val_bleu"]] == [9, 19, 29]
    # The linear decay of the new plan: it ends at update 30, not at the first run's 20.
    schedule = read_checkpoint(run / "checkpoints" / "last.ckpt")["lr_schedulers"][0]
    assert schedule["lr_lambdas"][0]["end"] == 30


@pytest.mark.parametrize("within_time", [True, False])
def test_a_run_stopped_by_its_time_budget_ends_with_its_lr_decayed_when_asked(
    multi30k_slice, tmp_path, monkeypatch, within_time
):
    """A slow machine, simulated: Lightning's Timer reads 2 s of training per update, so the
    60-second budget ends the run at update 30 of its 60."""
    from lightning.pytorch.callbacks import Timer

    seen = {}
    spied = Timer.on_train_batch_end

    def spy(self, trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return spied(self, trainer, *args, **kwargs)

    monkeypatch.setattr(Timer, "on_train_batch_end", spy)
    monkeypatch.setattr(
        Timer,
        "time_elapsed",
        lambda self, stage="train": 2.0 * seen["trainer"].global_step if seen else 0.0,
    )
    run = tmp_path / "run"
    recipe = tiny_recipe(
        multi30k_slice,
        tmp_path / "cache",
        *("--optim.schedule", "linear", "--optim.warmup_steps", "5"),
        *("--trainer.val_check_interval", "10", "--trainer.max_time_minutes", "1"),
        *("--optim.decay_within_time", str(within_time).lower()),
    )
    assert train(recipe, run)["steps"] == 30
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    lr = last["optimizer_states"][0]["param_groups"][0]["lr"]
    decay = last["lr_schedulers"][0]["lr_lambdas"][0]
    if within_time:  # aimed at update 30 at the first validation (20 s for 10 updates)
        assert (decay["end"], decay["planned_end"], lr) == (30, 60, 0.0)
    else:  # cut on the way down: 26 of the 55 decay updates done
        assert (decay["end"], lr) == (60, pytest.approx(0.005 * 29 / 55))


def test_keep_last_keeps_exactly_the_last_validations_across_a_resume(multi30k_slice, tmp_path):
    """last.ckpt is written after the recent checkpoint of its validation, so it records that
    file: a resumed run deletes it in its turn instead of keeping it for ever."""
    extra = ("--trainer.val_check_interval", "10", "--trainer.save_top_k", "1")
    extra += ("--trainer.keep_last", "2", "--trainer.average_last", "0")
    run = crashed_run(multi30k_slice, tmp_path, 25, *extra)
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *extra), run)
    recent = sorted(path.name for path in (run / "checkpoints").glob("recent-step*.ckpt"))
    assert recent == ["recent-step0000050.ckpt", "recent-step0000060.ckpt"]


def test_a_run_resumed_at_its_max_steps_is_scored_and_one_past_it_is_refused(
    multi30k_slice, tmp_path
):
    extra = ("--trainer.val_check_interval", "10", "--trainer.average_last", "0")
    run = crashed_run(multi30k_slice, tmp_path, 25, *extra)  # last.ckpt at update 20
    with pytest.raises(RunDirError, match=r"at update 20 .*past --trainer.max_steps 15; give"):
        train(
            tiny_recipe(multi30k_slice, tmp_path / "cache", *extra, "--trainer.max_steps", "15"),
            run,
        )
    results = train(
        tiny_recipe(multi30k_slice, tmp_path / "cache", *extra, "--trainer.max_steps", "20"), run
    )
    assert results["steps"] == 20 and results["train_tgt_tokens_per_s"] is None  # none trained
    assert {"bleu", "chrf"} <= set(results["valid"])


def test_a_fine_tuning_run_resumes_by_the_command_that_started_it(
    trained_run, multi30k_slice, tmp_path, caplog
):
    """Its saved recipe holds the trained model's architecture and vocabulary, with the
    recipe's dropout: the same command (its own vocab_size and d_model ignored, as said in
    its log) resumes and trains further instead of finding the sections changed."""
    import seq2seq.training.train as train_module

    run, _ = trained_run
    source = str(run / "checkpoints" / "last.ckpt")
    own = ("--data.tokenizer.vocab_size", "300", "--model.d_model", "64")
    own += ("--model.dropout", "0.3", "--trainer.average_last", "0")
    fine = tmp_path / "fine"
    for steps in ("2", "4"):
        recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", *own, "--trainer.max_steps", steps)
        with caplog.at_level(logging.INFO, logger=train_module.__name__):
            results = train(recipe, fine, init_from=source)
        assert results["steps"] == int(steps)
    said = [r.getMessage() for r in caplog.records if r.name == train_module.__name__]
    assert f"fine-tuning keeps {source}'s architecture: model.d_model 32 (recipe: 64)" in said
    assert (
        f"resuming {fine} from {fine / 'checkpoints' / 'last.ckpt'} (update 2); --init-from {source} is not used (it starts a new run)"
        in said
    )
    saved = yaml.safe_load((fine / "recipe.yaml").read_text())
    assert saved["model"]["d_model"] == 32 and saved["model"]["dropout"] == 0.3
    assert saved["data"]["tokenizer"]["vocab_size"] == 400


def test_init_from_a_lowercasing_model_adopts_its_lowercasing(multi30k_slice, tmp_path):
    lower = ("--data.tokenizer.lowercase", "true", "--trainer.max_steps", "2")
    lower += ("--trainer.val_check_interval", "2", "--trainer.average_last", "0")
    parent = tmp_path / "lower"
    train(tiny_recipe(multi30k_slice, tmp_path / "cache", *lower), parent)
    child = tiny_recipe(multi30k_slice, tmp_path / "cache", *lower[2:])  # the recipe's: cased
    results = train(child, tmp_path / "child", init_from=str(parent / "checkpoints" / "last.ckpt"))
    assert results["steps"] == 2
    saved = yaml.safe_load((tmp_path / "child" / "recipe.yaml").read_text())
    assert saved["data"]["tokenizer"]["lowercase"] is True


def test_a_min_len_no_output_can_reach_is_refused_before_any_work(multi30k_slice, tmp_path):
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", "--decode.min_len", "1000")
    with pytest.raises(ValueError, match=r"decode.min_len=1000 exceeds the longest output"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_staged_beside_itself_not_in_the_temporary_folder(tmp_path, monkeypatch):
    """Lightning's writer went through a file in $TMPDIR, which a kill left there."""
    import tempfile

    from seq2seq.training.train import AtomicCheckpointIO

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert list(scratch.iterdir()) == [] and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_signal_after_results_are_written_says_the_run_finished(multi30k_slice, tmp_path):
    from seq2seq.training.train import Interrupted, run_finished

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"steps": 60}))
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache")  # max_steps 60
    assert run_finished(run, recipe)
    assert str(Interrupted(run, True, finished=True)) == (
        f"terminated once {run} had finished ({run / 'results.json'} is written)"
    )
    further = tiny_recipe(multi30k_slice, tmp_path / "cache", "--trainer.max_steps", "80")
    assert not run_finished(run, further)  # training further: the signal stops a resumable run
    timed = ("--trainer.max_steps", "-1", "--trainer.max_time_minutes", "5")
    assert run_finished(run, tiny_recipe(multi30k_slice, tmp_path / "cache", *timed))
    assert "run the same command to resume" in str(Interrupted(run, False, finished=False))


def test_fine_tuning_into_a_prepared_folder_adopts_the_models_tokenizer(
    trained_run, multi30k_slice, tmp_path
):
    """The folder's own SentencePiece record (another vocabulary) goes with its model."""
    from seq2seq.data.report import prepare

    run, _ = trained_run
    folder = tmp_path / "fine"
    prepared = tiny_recipe(multi30k_slice, tmp_path / "cache", "--data.tokenizer.vocab_size", "300")
    prepare(prepared.data, folder)
    short = ("--trainer.max_steps", "2", "--trainer.average_last", "0")
    recipe = tiny_recipe(multi30k_slice, tmp_path / "cache", *short)
    results = train(recipe, folder, init_from=str(run / "checkpoints" / "last.ckpt"))
    assert results["steps"] == 2
    assert (folder / "spm.model").read_bytes() == (run / "spm.model").read_bytes()
    assert not (folder / "spm.json").exists()


def test_a_run_begun_without_init_from_resumes_though_its_file_is_gone(
    trained_run, multi30k_slice, monkeypatch, tmp_path
):
    run, _ = trained_run
    stop_when_it_resumes(monkeypatch)
    recipe = tiny_recipe(multi30k_slice, run / "cache", "--trainer.max_steps", "61")
    with pytest.raises(Resumed):
        train(recipe, run, init_from=str(tmp_path / "moved-away.ckpt"))
