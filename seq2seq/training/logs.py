"""The run's metrics.csv, kept so that a kill -9 at any moment loses none of it.

A resume starts from a checkpoint and keeps the log's rows below that checkpoint's step
(`seq2seq.training.plot.read_metrics`), so two things must hold at every moment:

- the log on disk reaches every checkpoint on disk: `LogsBeforeCheckpoints` writes the
  logged rows out before any checkpoint is saved (Lightning writes its CSV log only every
  100 steps, so the validation just before a checkpoint was often not on disk yet);
- the log on disk is whole: `WholeFileCSVLogger` writes the file under a temporary name
  and renames it, where Lightning appends in place and rewrites the whole file in place
  when a new metric appears (a kill then left a truncated or half-written file).
"""

from __future__ import annotations

import csv
import os

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from seq2seq.atomic import atomic_file


class _WholeFileWriter(ExperimentWriter):
    """Lightning's CSV writer, writing the whole file atomically at each save."""

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()  # extends self.metrics_keys with the new metrics' names
        rows: list[dict[str, str]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
        with atomic_file(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
            writer.writerows(self.metrics)
        self.metrics = []


class WholeFileCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose metrics.csv is always whole on disk (see the module)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _WholeFileWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _WholeFileWriter(log_dir=self.log_dir)
        return self._experiment


class LogsBeforeCheckpoints(Callback):
    """Write every logger's rows out before each checkpoint (validation's, timed, final)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
