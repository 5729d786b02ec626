"""A decay that ends when the time budget does (`optim.decay_within_time`).

A linear or cosine schedule decays to zero at trainer.max_steps. When the run also has a time
budget (trainer.max_time_minutes) and the machine is too slow to reach max_steps within it,
Lightning's Timer stops the run part-way down the decay, at a learning rate far from zero,
and the last updates, which a decayed run spends on small steps, never happen. This callback
re-aims the decay at every validation interval: at the speed so far (training time, from
Lightning's Timer, which a resumed run carries on, over updates done), it estimates the
update the run will have reached when its time runs out, and moves the decay's end there
(never past max_steps; later again if the run speeds up). On a machine fast enough for
max_steps nothing changes. Under several processes rank 0's clock decides, so every rank
keeps the same lr.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from seq2seq.training.optim import Decay
from seq2seq.training.progress import time_budget


def aimed_end(done: int, elapsed_s: float, budget_s: float, end: int) -> int:
    """The update at which the decay should end: `end`, or earlier when the run's speed so far
    (`done` updates in `elapsed_s`) reaches only that many within `budget_s`; always after
    `done`."""
    if done < 1 or elapsed_s <= 0:
        return end
    reachable = done + int(max(budget_s - elapsed_s, 0.0) * done / elapsed_s)
    return max(min(end, reachable), done + 1)


class DecayWithinTime(Callback):
    """Every `interval` updates past warm-up, move the schedule's end (a `Decay`) to
    `aimed_end`, capped by the planned end, for a budget of `budget_s` seconds of training;
    stop the run when the decay has ended before max_steps (its remaining updates would
    change nothing)."""

    def __init__(self, interval: int, budget_s: float) -> None:
        self.interval = interval
        self.budget_s = budget_s
        self._aimed_at = -1  # the update of the last check (gradient accumulation repeats it)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        timer = time_budget(trainer)
        done = trainer.global_step
        if not isinstance(schedule, Decay) or timer is None or done < schedule.warmup_steps:
            return
        if schedule.end < schedule.planned_end and done >= schedule.end:
            trainer.should_stop = True  # Lightning validates, then ends the run
            return
        if done % self.interval or done == self._aimed_at:
            return
        self._aimed_at = done
        elapsed = trainer.strategy.broadcast(timer.time_elapsed())
        end = aimed_end(done, elapsed, self.budget_s, schedule.planned_end)
        if end == schedule.end:
            return
        if abs(schedule.end - end) >= 0.02 * schedule.end:
            rank_zero_info(  # where Lightning says "Time limit reached"
                f"time budget: the lr decay now ends at update {end} (was {schedule.end}), "
                f"where this run gets to in trainer.max_time_minutes at {elapsed / done:.2f} s "
                "per update"
            )
        schedule.aim(done, end)
