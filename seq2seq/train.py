"""`seq2seq train`: a recipe in, a trained model and its scores out. Resumable at any moment.

The run directory's layout is documented in `seq2seq/checkpoint.py`. Running the same
command on an existing run directory resumes from checkpoints/last.ckpt (model, optimizer,
schedule, RNG states, data position); a finished run (results.json present) is not
overwritten unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from seq2seq.checkpoint import (
    PREPARE_LOCK,
    checkpoint_dir,
    checkpoints_by_step,
    last_checkpoint,
    load_model,
    recent_checkpoints,
    resolve_checkpoint,
)
from seq2seq.config import Recipe
from seq2seq.module import TranslationModule
from seq2seq.optim import schedule_factor
from seq2seq.progress import StepProgressBar
from seq2seq.recipe import dump_recipe, recipe_to_dict
from seq2seq.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (finished, or a different recipe)."""


class CurvesCallback(Callback):
    """Redraw curves.png after each validation."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            from seq2seq.plot import plot_run

            for logger in trainer.loggers:
                logger.save()
            try:
                plot_run(self.run_dir)
            except (FileNotFoundError, ValueError) as err:
                log.warning("curves.png not drawn: %s", err)


class ValidateFinalUpdate(Callback):
    """Validate after the run's last update even when max_steps is not a multiple of the
    validation interval. Lightning validates every `val_check_interval` updates, and when a run
    is asked to stop; a run that simply reaches max_steps would end with its final updates never
    scored nor considered for the best checkpoint. Asking it to stop at max_steps makes the loop
    validate before it ends (once: a step on the interval validates anyway)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class FinalState(Callback):
    """When training ends (max_steps, max_time, early stopping), inside the training processes:
    save last.ckpt if the final steps came after the last validation's checkpoint, and record
    the step count and throughput in train_state.json (spawned workers' trainers are not the
    caller's, so this is how the caller learns them)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.last_saved_step != trainer.global_step:
            trainer.save_checkpoint(checkpoint_dir(self.run_dir) / "last.ckpt")
        if trainer.is_global_zero:
            state = {
                "steps": trainer.global_step,
                "train_tgt_tokens_per_s": pl_module.tokens_per_second(),
            }
            (self.run_dir / "train_state.json").write_text(json.dumps(state) + "\n")


#: The start of Lightning's warning on a mid-epoch resume (see `train`).
MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"

#: What a run writes into its directory, and all that --overwrite removes (nothing else).
RUN_FILES = (
    "results.json",
    "recipe.yaml",
    "train_state.json",
    "curves.png",
    PREPARE_LOCK,
    *(f"spm{part}.{ext}" for part in ("", ".src", ".tgt") for ext in ("model", "vocab")),
)
RUN_FOLDERS = ("checkpoints", "logs", "cache")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files (checkpoints, logs, tokenizer, caches, results) so the
    run starts afresh, whatever the new recipe; other files in the folder are left alone."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _ranks_started_together() -> bool:
    """Whether an outside launcher (torchrun, SLURM's srun) started all ranks at once, rather
    than Lightning starting the others from rank 0 (which sets no RANK)."""
    env = os.environ
    torchrun = "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1
    return torchrun or int(env.get("SLURM_NTASKS", "1")) > 1


def _check_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Refuses to clobber."""
    results = run_dir / "results.json"
    if results.exists() and not overwrite:
        raise RunDirError(
            f"{run_dir}: this run finished ({results} exists); pass --overwrite to train it "
            "again from scratch, or choose another --run-dir"
        )
    if overwrite:
        if _ranks_started_together():
            raise RunDirError(
                f"{run_dir}: --overwrite cannot clear a run directory that ranks started "
                "together (torchrun, srun) already use; remove the run's files first, then "
                "launch without --overwrite"
            )
        # Lightning's own launcher runs this command again for the other ranks once rank 0
        # has prepared the run: they must not remove what it prepared.
        if rank_zero_only.rank == 0:
            _clear_run_dir(run_dir)
        return None
    saved = run_dir / "recipe.yaml"
    if saved.exists():
        before = yaml.safe_load(saved.read_text())
        now = recipe_to_dict(recipe)
        for key in ("src_vocab_size", "tgt_vocab_size"):  # 0 means "from the tokenizer"
            if now["model"][key] == 0:
                now["model"][key] = before["model"][key]
        for section in ("model", "data"):
            if before.get(section) != now.get(section):
                raise RunDirError(
                    f"{run_dir}: the recipe's '{section}' section differs from the one this run "
                    f"was started with ({saved}); resume with the same recipe or use another --run-dir"
                )
    return last_checkpoint(run_dir)


def _adopt_tokenizer(recipe: Recipe, tokenizer: Tokenizer, run_dir: Path) -> Recipe:
    """Fine-tuning keeps the trained model's vocabulary: put its SentencePiece model(s) where
    the data path reuses them, and make the recipe's tokenizer section describe them."""
    state = tokenizer.to_state()
    protos = [state["src_model"]] if tokenizer.joint else [state["src_model"], state["tgt_model"]]
    for path, proto in zip(Tokenizer.model_files(run_dir, tokenizer.joint), protos, strict=True):
        path.write_bytes(proto)
    tok_cfg = dataclasses.replace(
        recipe.data.tokenizer, joint=tokenizer.joint, vocab_size=tokenizer.src_vocab_size
    )
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, tokenizer=tok_cfg))


def build_trainer(recipe: Recipe, run_dir: Path) -> L.Trainer:
    t = recipe.trainer
    best = ModelCheckpoint(
        dirpath=checkpoint_dir(run_dir),
        filename="step{step:07d}-bleu{val_bleu:.2f}",
        auto_insert_metric_name=False,
        monitor="val_bleu",
        mode="max",
        save_top_k=t.save_top_k,
        save_last=True,
    )
    callbacks: list[Callback] = [best]
    if t.keep_last > 0:
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir(run_dir),
                filename="recent-step{step:07d}",
                auto_insert_metric_name=False,
                monitor="step",
                mode="max",
                save_top_k=t.keep_last,
            )
        )
    callbacks += [
        CurvesCallback(run_dir),
        ValidateFinalUpdate(),
        FinalState(run_dir),
        StepProgressBar(),
    ]
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping("val_bleu", mode="max", patience=t.early_stopping_patience))
    loggers = [
        CSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir, name="logs", version="", default_hp_metric=False),
    ]
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        max_time={"minutes": t.max_time_minutes} if t.max_time_minutes else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        # Lightning counts validation intervals in batches; the recipe counts updates.
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our batch sampler shards by rank itself
        callbacks=callbacks,
        logger=loggers,
        enable_model_summary=False,
    )


def train(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    init_from: str | None = None,
    recipe_path: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) the run in `run_dir`; return the results written to results.json."""
    from seq2seq.datamodule import TranslationDataModule

    run_dir = Path(run_dir)
    schedule_factor(recipe.optim, recipe.trainer.max_steps)  # a bad schedule fails before any work
    resume = _check_run_dir(run_dir, recipe, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    start = time.perf_counter()

    init = load_model(init_from) if init_from and resume is None else None
    if init:
        recipe = _adopt_tokenizer(recipe, init.tokenizer, run_dir)
    datamodule = TranslationDataModule(recipe.data, run_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    model_cfg = (
        init.model.cfg
        if init
        else dataclasses.replace(
            recipe.model,
            src_vocab_size=tokenizer.src_vocab_size,
            tgt_vocab_size=tokenizer.tgt_vocab_size,
        )
    )
    datamodule.check_positions(model_cfg.max_positions)
    recipe = dataclasses.replace(recipe, model=model_cfg)
    if rank_zero_only.rank == 0:  # atomically: ranks started together read it to compare
        staged = run_dir / f".recipe.yaml.{os.getpid()}"
        staged.write_text(dump_recipe(recipe))
        staged.replace(run_dir / "recipe.yaml")

    module = TranslationModule(
        model_cfg,
        recipe.optim,
        recipe.decode,
        recipe_to_dict(recipe),
        val_beam=recipe.trainer.val_beam,
        compile_model=recipe.trainer.compile,
    )
    module.tokenizer, module.valid_refs = tokenizer, datamodule.valid_references
    if init:
        module.model.load_state_dict(init.model.state_dict())
        log.info("fine-tuning from %s (fresh optimizer and schedule)", init.path)

    trainer = build_trainer(recipe, run_dir)
    try:
        with warnings.catch_warnings():
            # Lightning warns that resuming mid-epoch with a loader it cannot restore is
            # unreliable; the data module restores the sampler's position itself (tested:
            # bit-identical parameters), so the warning would be a false alarm.
            warnings.filterwarnings("ignore", message=MID_EPOCH_RESUME_WARNING)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"out of memory with data.max_tokens={recipe.data.max_tokens}; try a smaller "
            "--data.max_tokens (and raise --trainer.accumulate_grad_batches to keep the batch size)"
        ) from err
    if trainer.interrupted:  # Ctrl-C: Lightning stopped cleanly; last.ckpt is the resume point
        raise KeyboardInterrupt(
            f"training interrupted; run the same command to resume from {run_dir}"
        )
    if not trainer.is_global_zero:
        return {}
    return _finish(recipe, run_dir, trainer, datamodule, time.perf_counter() - start)


def _finish(recipe: Recipe, run_dir: Path, trainer: L.Trainer, datamodule, wall: float) -> dict:
    """Average checkpoints if asked, score valid and test with the chosen model (the recipe's
    decoding defaults, and greedy beside them), write results.json."""
    from seq2seq.average import average_checkpoints
    from seq2seq.evaluate import score
    from seq2seq.translate import translate_texts

    if recipe.trainer.average_last > 1:
        by_step = recent_checkpoints(run_dir) if recipe.trainer.keep_last else None
        kept = (by_step or checkpoints_by_step(run_dir))[-recipe.trainer.average_last :]
        if len(kept) > 1:
            average_checkpoints(kept, checkpoint_dir(run_dir) / "averaged.ckpt")
    chosen = resolve_checkpoint(run_dir)
    loaded = load_model(chosen)
    state = json.loads((run_dir / "train_state.json").read_text())
    results: dict = {
        "checkpoint": str(chosen),
        "steps": state["steps"],
        "wall_time_s": round(wall, 1),
        "train_tgt_tokens_per_s": round(state["train_tgt_tokens_per_s"], 1),
        "decode": dataclasses.asdict(recipe.decode),
    }
    splits = {"valid": (datamodule.valid_sources, datamodule.valid_references)}
    if recipe.data.test is not None:
        splits["test"] = (datamodule.test_sources, datamodule.test_references)
    searches = {"": recipe.decode}
    if recipe.decode.beam > 1:
        searches["_greedy"] = dataclasses.replace(recipe.decode, beam=1, nbest=1)
    for split, (sources, refs) in splits.items():
        for suffix, decode in searches.items():
            hyps = translate_texts(
                loaded.model, loaded.tokenizer, sources, dataclasses.replace(decode, nbest=1)
            )
            results[split + suffix] = score(hyps, refs, ["bleu", "chrf"])
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
