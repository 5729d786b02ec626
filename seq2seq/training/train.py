"""`seq2seq train`: a recipe in, a trained model and its scores out. Resumable at any moment.

The run directory's layout is documented in `seq2seq/rundir.py`. Running the same
command on an existing run directory resumes from checkpoints/last.ckpt (model, optimizer,
schedule, RNG states, data position); a finished run (results.json present) is not
overwritten unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from seq2seq import rundir
from seq2seq.atomic import atomic_file, write_atomically
from seq2seq.config import DROPOUT_KEYS, Recipe
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.inference.checkpoint import (
    CheckpointError,
    LoadedModel,
    UnsafeCheckpointError,
    load_model,
    read_checkpoint,
    resolve_checkpoint,
)
from seq2seq.recipe import dump_recipe, recipe_to_dict
from seq2seq.rundir import RunDir
from seq2seq.training.budget import DecayWithinTime
from seq2seq.training.logs import LogsBeforeCheckpoints, WholeFileCSVLogger
from seq2seq.training.module import TranslationModule
from seq2seq.training.optim import schedule_factor
from seq2seq.training.precision import resolve_precision
from seq2seq.training.progress import StepProgressBar

log = logging.getLogger(__name__)


class _NoAdvert(logging.Filter):
    """Drop Lightning's "Tip: ... try installing litlogger" line, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())
#: Lightning's own use of torch's pytree API warns on every run; nothing we call causes it.
PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (exit 130) or SIGTERM (exit 143); the run resumes from its
    last checkpoint when the same command runs again."""

    def __init__(self, run_dir: Path, terminated: bool = False, finished: bool = False) -> None:
        self.exit_code = 143 if terminated else 130
        how = "terminated" if terminated else "interrupted"
        if finished:  # after results.json was written: nothing is left to resume
            said = f"{how} once {run_dir} had finished ({RunDir(run_dir).results} is written)"
        else:
            said = f"{how}: run the same command to resume {run_dir} from its last checkpoint"
        super().__init__(said)


def run_finished(run_dir: str | os.PathLike, recipe: Recipe) -> bool:
    """Whether the run's results.json says it trained the recipe's max_steps (a signal after
    it was written leaves nothing to resume)."""
    steps = _finished_steps(RunDir(run_dir).results)
    return steps is not None and recipe.trainer.max_steps <= steps  # as `_check_run_dir` says


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (finished, or a different recipe)."""


class CurvesCallback(Callback):
    """Redraw curves.png after each validation."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            from seq2seq.training.plot import plot_run

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
            trainer.save_checkpoint(RunDir(self.run_dir).last, weights_only=False)
        if trainer.is_global_zero:
            state = {
                "steps": trainer.global_step,
                "train_tgt_tokens_per_s": pl_module.tokens_per_second(),
            }
            write_atomically(RunDir(self.run_dir).train_state, json.dumps(state) + "\n")


class SaveEveryMinutes(Callback):
    """Save last.ckpt at the first update boundary `minutes` after the previous save (of any
    kind), so a kill loses at most that much work between validations. Rank 0's clock decides
    for every rank (saving is collective).

    It saves only after an update whose checkpoint would be complete. Not after one that
    logs a metrics row: Lightning logs it after the batch-end hooks, so the checkpoint would
    be on disk before the row. Not after one that validation follows (on the interval, or
    because the run stops): the validation's checkpoint saves last.ckpt once it has scored,
    and one taken before it would resume as if it had run (Lightning's loop skips it on a
    restart). So it must come after every callback that can stop the run at this update:
    ValidateFinalUpdate and the time budget's Timer."""

    def __init__(self, run_dir: Path, minutes: float, val_check_interval: int, log_every: int):
        self.last, self.seconds = RunDir(run_dir).last, minutes * 60
        self.val_check_interval, self.log_every = val_check_interval, log_every
        self.saved_at, self.step = time.monotonic(), -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # inside an accumulation of batches
            return
        self.step = step = trainer.global_step
        complete = not (
            trainer.should_stop or step % self.val_check_interval == 0 or step % self.log_every == 0
        )
        due = time.monotonic() - self.saved_at >= self.seconds and complete
        if trainer.strategy.broadcast(due):
            trainer.save_checkpoint(self.last, weights_only=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        self.saved_at = time.monotonic()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing under a temporary name beside the checkpoint
    and renaming once the file is complete (seq2seq.atomic): a kill or a full disk while
    saving leaves the previous last.ckpt whole (and a stray temporary file, which the next
    start of the run removes), never a truncated one. torch.save writes the staged file
    itself: Lightning's own writer went through a temporary file in $TMPDIR, which a kill
    left there, a whole checkpoint in size."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)


#: The start of Lightning's warning on a mid-epoch resume (see `train`).
MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def _ranks_started_together() -> bool:
    """Whether an outside launcher (torchrun, SLURM's srun) started all ranks at once, rather
    than Lightning starting the others from rank 0 (which sets no RANK)."""
    env = os.environ
    torchrun = "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1
    return torchrun or int(env.get("SLURM_NTASKS", "1")) > 1


def _check_run_dir(
    run_dir: Path,
    recipe: Recipe,
    overwrite: bool,
    saved: dict | None,
    fine_tuning: Recipe | None = None,
) -> tuple[Path, int] | None:
    """The checkpoint to resume from and its step, or None for a fresh run. Refuses to clobber,
    and to resume with another model or data section than the run was started with (`saved`,
    its recipe.yaml: `_saved_recipe`): the recipe's, or with --init-from (`fine_tuning`) the
    one a fine-tuning run trains by."""
    run = RunDir(run_dir)
    results = run.results
    if results.exists() and not overwrite:
        finished = _finished_steps(results)
        if finished is None or recipe.trainer.max_steps <= finished:
            raise RunDirError(
                f"{run_dir}: this run finished ({results} exists, {finished} updates); pass "
                "--overwrite to train it again from scratch, a larger --trainer.max_steps to "
                "train it further, or choose another --run-dir"
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
            run.clear()
        return None
    if saved is not None:
        differs = [_differing_section(saved, r) for r in (fine_tuning, recipe) if r is not None]
        if all(differs):
            raise RunDirError(
                f"{run_dir}: the recipe's '{differs[-1]}' section differs from the one this run "
                f"was started with ({run.recipe}); resume with the same recipe or use another "
                "--run-dir"
            )
    return _resume_point(run)


def _saved_recipe(run_dir: Path) -> dict | None:
    """The recipe a run was started with (its recipe.yaml), None before it was."""
    path = RunDir(run_dir).recipe
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _differing_section(before: dict, recipe: Recipe) -> str | None:
    """The first of the model and data sections that differs between a run's saved recipe
    and `recipe`, or None."""
    now = recipe_to_dict(recipe)
    for key in ("src_vocab_size", "tgt_vocab_size"):  # 0 means "from the tokenizer"
        if now["model"][key] == 0:
            now["model"][key] = before["model"][key]
    return next((s for s in ("model", "data") if before.get(s) != now.get(s)), None)


def _check_min_len(recipe: Recipe) -> None:
    """Refuse a decode.min_len no output can reach, before any work (validation would fail
    on it after the first interval)."""
    longest = recipe.model.max_positions - 1
    if recipe.decode.min_len > longest:
        raise ValueError(
            f"decode.min_len={recipe.decode.min_len} exceeds the longest output the model can "
            f"write ({longest} tokens: model.max_positions={recipe.model.max_positions})"
        )


def _check_steps_left(run_dir: Path, recipe: Recipe, resume: Path, step: int) -> None:
    """Refuse to resume a run past the budget asked for: its checkpoint is at `step`, beyond
    trainer.max_steps (the same budget finishes it: it is scored at that checkpoint)."""
    max_steps = recipe.trainer.max_steps
    if 0 < max_steps < step:
        raise RunDirError(
            f"{run_dir}: this run is at update {step} ({resume}), past --trainer.max_steps "
            f"{max_steps}; give at least {step} to finish it there, or more to train it further"
        )


def _finished_steps(results: Path) -> int | None:
    """The updates a finished run trained for, from its results.json (None if unreadable)."""
    try:
        steps = json.loads(results.read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def _resume_point(run: RunDir) -> tuple[Path, int] | None:
    """The checkpoint to resume from, and its step: last.ckpt, or, when it is truncated or corrupt (a full
    disk, a kill while saving), the newest other checkpoint that loads, with one warning naming
    both. None when the run has no checkpoint yet. A file that would run code is refused."""
    candidates = ([run.last] if run.last.is_file() else []) + run.kept_newest_first()
    broken: CheckpointError | None = None
    for path in candidates:
        try:
            ckpt = read_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            broken = broken or err
            continue
        if "loops" not in ckpt:  # e.g. an averaged checkpoint: weights only, no trainer state
            continue
        if broken is not None:
            log.warning("%s; resuming from %s instead", broken, path)
        return path, ckpt["global_step"]
    if broken is not None:
        raise broken
    return None


def _fine_tuning(recipe: Recipe, init: LoadedModel) -> Recipe:
    """The recipe a run started with --init-from trains by: the trained model's architecture
    and vocabulary with the recipe's dropout rates, and a tokenizer section that describes the
    model's SentencePiece model(s) (joint, size, lowercasing), which the run adopts."""
    tok = init.tokenizer
    model = dataclasses.replace(
        init.model.cfg, **{key: getattr(recipe.model, key) for key in DROPOUT_KEYS}
    )
    tok_cfg = dataclasses.replace(
        recipe.data.tokenizer,
        joint=tok.joint,
        vocab_size=tok.src_vocab_size,
        lowercase=tok.lowercase,
    )
    data = dataclasses.replace(recipe.data, tokenizer=tok_cfg)
    return dataclasses.replace(recipe, model=model, data=data)


def _adopt_tokenizer(init: LoadedModel, run_dir: Path) -> None:
    """Put a trained model's SentencePiece model(s) where the data path reuses them, without
    a record of their training (a `prepare` of this folder left one of its own model's)."""
    (run_dir / rundir.SPM_TRAINED_ON).unlink(missing_ok=True)
    tokenizer = init.tokenizer
    state = tokenizer.to_state()
    protos = [state["src_model"]] if tokenizer.joint else [state["src_model"], state["tgt_model"]]
    for path, proto in zip(Tokenizer.model_files(run_dir, tokenizer.joint), protos, strict=True):
        path.write_bytes(proto)


def _unused_architecture(recipe: Recipe, fine: Recipe) -> str:
    """The recipe's architecture keys that a fine-tuning run does not take ("" if none)."""
    skip = {*DROPOUT_KEYS, "src_vocab_size", "tgt_vocab_size"}
    mine, theirs = dataclasses.asdict(recipe.model), dataclasses.asdict(fine.model)
    return ", ".join(
        f"model.{key} {theirs[key]} (recipe: {mine[key]})"
        for key in mine
        if key not in skip and mine[key] != theirs[key]
    )


def _checkpoints(
    run_dir: Path, pattern: str, monitor: str, top_k: int, save_last: bool = False
) -> ModelCheckpoint:
    """Keep the `top_k` checkpoints with the highest `monitor`, named by `pattern`. They
    overwrite rather than version: last.ckpt is also written by SaveEveryMinutes and
    FinalState, and a last-v1.ckpt beside it would never be resumed from."""
    return ModelCheckpoint(
        dirpath=RunDir(run_dir).checkpoints,
        filename=pattern,
        auto_insert_metric_name=False,
        monitor=monitor,
        mode="max",
        save_top_k=top_k,
        save_last=save_last,
        enable_version_counter=False,
    )


def build_trainer(recipe: Recipe, run_dir: Path) -> L.Trainer:
    t = recipe.trainer
    callbacks: list[Callback] = []
    if t.keep_last > 0:  # the last N validations', whatever their BLEU
        # First: the best-k callback below writes last.ckpt, which must hold this one's record
        # of the file it just wrote, or a resumed run never deletes that file.
        callbacks.append(_checkpoints(run_dir, rundir.RECENT_PATTERN, "step", t.keep_last))
    callbacks += [
        _checkpoints(run_dir, rundir.BEST_PATTERN, "val_bleu", t.save_top_k, save_last=True),
        LogsBeforeCheckpoints(),
        CurvesCallback(run_dir),
        ValidateFinalUpdate(),
        FinalState(run_dir),
        StepProgressBar(),
    ]
    if t.max_time_minutes:  # here rather than Trainer(max_time=): before SaveEveryMinutes
        callbacks.append(Timer(duration={"minutes": t.max_time_minutes}, interval="step"))
    if t.save_every_minutes is not None:
        every = (t.val_check_interval, t.log_every_n_steps)
        callbacks.append(SaveEveryMinutes(run_dir, t.save_every_minutes, *every))
    if recipe.optim.decay_within_time and t.max_time_minutes:
        callbacks.append(DecayWithinTime(t.val_check_interval, t.max_time_minutes * 60))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping("val_bleu", mode="max", patience=t.early_stopping_patience))
    loggers = [
        WholeFileCSVLogger(run_dir, name=rundir.LOGS, version=""),
        TensorBoardLogger(run_dir, name=rundir.LOGS, version="", default_hp_metric=False),
    ]
    # Processes training together (Lightning's 'auto' is one on a CPU; other strings: several).
    devices = t.devices if isinstance(t.devices, int) else 1 if t.devices == "auto" else 2
    processes = devices * t.num_nodes
    precision = resolve_precision(
        t.precision, t.accelerator, recipe.model, recipe.data.max_tokens, processes
    )
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
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
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
    )


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for where torch sees none fails at once, in one line, not after the data
    and the tokenizer are prepared (Lightning would refuse only when it starts)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"trainer.accelerator={accelerator}: torch {torch.__version__} ({build}) sees no "
            "CUDA GPU here; use --trainer.accelerator cpu (or auto)"
        )


def train(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    init_from: str | None = None,
    recipe_path: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) the run in `run_dir`; return the results written to results.json.
    The command holds the run directory while it works (`RunDir.hold`: a second one on it is
    refused), and first removes what killed processes left half-written there."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir}: exists and is not a folder")
    if rank_zero_only.rank != 0:  # ranks started together: rank 0's command holds the run
        return _train(recipe, run_dir, init_from, overwrite)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / rundir.RUN_LOCK
    lock_existed = lock.exists()
    with RunDir(run_dir).hold():  # a command refused here removes nothing
        try:
            return _train(recipe, run_dir, init_from, overwrite)
        except BaseException:
            # Failed, it removes the lock file it made (while it still holds it); refused
            # before it wrote anything, it leaves the folder as it found it.
            if not lock_existed:
                lock.unlink(missing_ok=True)
                if created and not any(run_dir.iterdir()):
                    run_dir.rmdir()
            raise


def _train(recipe: Recipe, run_dir: Path, init_from: str | None, overwrite: bool) -> dict:
    from seq2seq.data.datamodule import TranslationDataModule

    check_accelerator(recipe.trainer.accelerator)
    schedule_factor(recipe.optim, recipe.trainer.max_steps)  # a bad schedule fails before any work
    saved = None if overwrite else _saved_recipe(run_dir)  # --overwrite starts afresh
    started_plain = saved is not None and _differing_section(saved, recipe) is None
    # --init-from is read where it matters: a new run, or one it started (a resume as begun
    # without it needs neither the file nor the time to load it).
    init = load_model(init_from) if init_from and not started_plain else None
    fine = _fine_tuning(recipe, init) if init else None
    resume_point = _check_run_dir(run_dir, recipe, overwrite, saved, fine)
    resume, step = resume_point if resume_point else (None, 0)
    resumed_fine_tuning = (
        resume is not None
        and fine is not None
        and saved is not None
        and _differing_section(saved, fine) is None
    )
    unused = ""  # the recipe's architecture keys a new fine-tuning run does not take
    if fine is not None and (resume is None or resumed_fine_tuning):
        unused = _unused_architecture(recipe, fine)
        recipe = fine  # a fine-tuning run, new or resumed by the command that started it
    _check_min_len(recipe)
    if resume is not None:
        _check_steps_left(run_dir, recipe, resume, step)
    if rank_zero_only.rank == 0:  # the holder of the run: killed writers' leftovers go
        RunDir(run_dir).remove_stale_staged()
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None and rank_zero_only.rank == 0:
        # The same command resumes, --init-from included: it starts a new run only.
        said = f"; --init-from {init_from} is not used (it starts a new run)" if init_from else ""
        log.info("resuming %s from %s (update %d)%s", run_dir, resume, step, said)
        RunDir(run_dir).keep_metrics_for_resume(step)
    elif unused and rank_zero_only.rank == 0:
        log.info("fine-tuning keeps %s's architecture: %s", init.path, unused)
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    start = time.perf_counter()

    fresh_init = init if resume is None else None  # weights to start from
    if fresh_init is not None:
        _adopt_tokenizer(fresh_init, run_dir)
    datamodule = TranslationDataModule(recipe.data, run_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    model_cfg = dataclasses.replace(
        recipe.model,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
    )
    datamodule.check_positions(model_cfg.max_positions)
    recipe = dataclasses.replace(recipe, model=model_cfg)
    if rank_zero_only.rank == 0:  # atomically: ranks started together read it to compare
        write_atomically(RunDir(run_dir).recipe, dump_recipe(recipe))

    module = TranslationModule(
        model_cfg,
        recipe.optim,
        recipe.decode,
        recipe_to_dict(recipe),
        val_beam=recipe.trainer.val_beam,
        compile_model=recipe.trainer.compile,
    )
    module.tokenizer, module.valid_refs = tokenizer, datamodule.valid_references
    if fresh_init is not None:
        module.model.load_state_dict(fresh_init.model.state_dict())
        log.info("fine-tuning from %s (fresh optimizer and schedule)", fresh_init.path)

    trainer = build_trainer(recipe, run_dir)
    try:
        with warnings.catch_warnings():
            # Lightning warns that resuming mid-epoch with a loader it cannot restore is
            # unreliable; the data module restores the sampler's position itself (tested:
            # bit-identical parameters), so the warning would be a false alarm.
            warnings.filterwarnings("ignore", message=MID_EPOCH_RESUME_WARNING)
            warnings.filterwarnings("ignore", message=PYTREE_WARNING)
            # On a resume, the earlier metrics.csv is already set aside (RunDir.
            # keep_metrics_for_resume) and the checkpoints are the run's own: nothing is lost.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"out of memory with data.max_tokens={recipe.data.max_tokens}; try a smaller "
            "--data.max_tokens (and raise --trainer.accumulate_grad_batches to keep the batch size)"
        ) from err
    except (SystemExit, KeyboardInterrupt) as err:  # Lightning exits 1 after Ctrl-C; SIGTERM
        raise Interrupted(run_dir, terminated=trainer.received_sigterm) from err
    if trainer.interrupted:  # stopped cleanly by a signal; last.ckpt is the resume point
        raise Interrupted(run_dir, terminated=trainer.received_sigterm)
    if not trainer.is_global_zero:
        return {}
    return _finish(recipe, run_dir, trainer, datamodule, start, step)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _first_update_s(trainer: L.Trainer, start: float) -> float | None:
    """Seconds from `start` to the end of this process's first update (None when it made
    none: a finished run scored again)."""
    first = trainer.lightning_module.first_update_at
    return None if first is None else round(first - start, 1)


def _train_state(path: Path, resumed_at: int) -> dict:
    """What FinalState recorded in the training processes (spawned ones included); where they
    trained no update (a run resumed at its max_steps, to be scored) it has no record of this
    attempt: the step resumed at, and no throughput."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        state = {}
    if state.get("steps", -1) < resumed_at:
        state = {"steps": resumed_at, "train_tgt_tokens_per_s": None}
    return state


def _finish(
    recipe: Recipe, run_dir: Path, trainer: L.Trainer, datamodule, start: float, resumed_at: int
) -> dict:
    """Average checkpoints if asked, score valid and test with the chosen model (the recipe's
    decoding defaults, and greedy beside them), write results.json."""
    from seq2seq.inference.evaluate import score
    from seq2seq.inference.translator import Translator
    from seq2seq.training.average import average_checkpoints

    wall = time.perf_counter() - start  # training; scoring below is not counted
    if recipe.trainer.average_last > 1:
        run = RunDir(run_dir)
        by_step = run.recent() if recipe.trainer.keep_last else None
        kept = (by_step or run.best_by_step())[-recipe.trainer.average_last :]
        if len(kept) > 1:
            average_checkpoints(kept, run.averaged)
    chosen = resolve_checkpoint(run_dir)
    translator = Translator.of([load_model(chosen)], "cpu", "fp32")
    state = _train_state(RunDir(run_dir).train_state, resumed_at)
    results: dict = {
        "checkpoint": str(chosen),
        "steps": state["steps"],
        "wall_time_s": round(wall, 1),
        # From the start of `train` (checks done, data not yet read) to the end of this
        # process's first update: data loading, model building and one step.
        "first_update_s": _first_update_s(trainer, start),
        "train_tgt_tokens_per_s": _rounded(state["train_tgt_tokens_per_s"]),
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
            hyps = translator.translate_texts(sources, dataclasses.replace(decode, nbest=1))
            results[split + suffix] = score(hyps, refs, ["bleu", "chrf"])
    write_atomically(RunDir(run_dir).results, json.dumps(results, indent=2) + "\n")
    return results
