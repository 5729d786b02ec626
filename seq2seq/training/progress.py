"""The training progress bar: one bar over the whole run, on stderr.

Lightning's default bar restarts every epoch and counts batches; a translation run is
planned in updates, so this bar counts optimizer steps up to max_steps, shows loss, lr and
tokens/s beside it, and its ETA is for the whole run. A run that also has a time budget
(`trainer.max_time_minutes`) ends at whichever comes first: its bar shows `step/max_steps`
with the step ETA, and the time left beside them.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc="train",
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0.1,
            unit="step",
        )

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(
            desc="validate",
            position=1,
            disable=self.is_disabled,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fresh validation bar with its number of batches (Lightning's would set it only at
        the first validation of the run, and show "0it" at every later one)."""
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self.val_progress_bar.reset(total=sum(trainer.num_val_batches))
            self._current_eval_dataloader_idx = 0  # the total above holds: no reset per batch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: object) -> None:
        self.train_progress_bar.set_description(f"train (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
            bar.update(step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar spans epochs

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        timer = time_budget(trainer)
        if timer is not None:
            left = int(timer.time_remaining("train") or 0)
            metrics["time_left"] = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        return metrics

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Close the bars, so that an error message starts on a line of its own."""
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()


def time_budget(trainer: L.Trainer) -> Timer | None:
    """Lightning's Timer callback when the run has a time budget, else None."""
    return next(
        (c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None),
        None,
    )
