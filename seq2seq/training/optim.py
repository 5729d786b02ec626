"""Adam with the inverse-square-root warm-up schedule ("Attention Is All You Need", eq. 3).

    lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)

The same curve can be given by its peak instead: lr(step) = peak * min(step / warmup,
sqrt(warmup / step)), with peak = d_model^-0.5 * warmup^-0.5 for the paper's setting.

For a run with a fixed budget of updates, `schedule: linear` or `cosine` keeps the same
warm-up and then decays the peak to zero at `decay_steps`, so the last updates are small
ones rather than being cut off at whatever lr step^-0.5 had reached. With
`optim.decay_within_time` the end of that decay can move earlier during the run (`Decay.aim`,
called by `training.budget`), so that a run stopped by its time budget has decayed too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from seq2seq.config import OptimConfig


def peak_lr(cfg: OptimConfig, d_model: int) -> float:
    """The learning rate at the end of warm-up."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_scale * d_model**-0.5 * cfg.warmup_steps**-0.5


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based, so the first update uses
    step 1 of the paper's formula): linear warm-up, then decay proportional to step^-0.5."""
    s = step + 1
    if warmup_steps <= 0:
        return 1.0 / s**0.5
    return min(s / warmup_steps, (warmup_steps / s) ** 0.5)


class Decay:
    """Multiplier of the peak lr for `schedule: linear|cosine`, called with the 0-based
    optimizer step: linear warm-up to 1 at `warmup_steps`, then down to 0 at update `end` (and
    0 after it). A run whose end falls within warm-up (a short smoke run) simply ends while
    warming up.

    The end can be moved while it runs: `aim(done, end)` makes the decay go on from the
    progress reached after `done` updates to zero at update `end`, without a jump in the lr.
    Its fields are plain numbers, which torch's LambdaLR saves into a checkpoint and restores
    on resume."""

    def __init__(self, warmup_steps: int, end: int, shape: str) -> None:
        self.warmup_steps = warmup_steps
        self.shape = shape
        self._start(end)

    def _start(self, end: int) -> None:
        self.planned_end = self.end = end  # the recipe's end; `end`: where it is aimed now
        self.anchor_step = self.warmup_steps  # the decay's progress is anchor_progress here
        self.anchor_progress = 0.0

    def replan(self, planned_end: int) -> None:
        """After a resume: a run trained further (to a larger max_steps) starts the decay of
        its new plan; one resumed on the same plan keeps its state, aim included."""
        if planned_end != self.planned_end:
            self._start(planned_end)

    def progress(self, s: int) -> float:
        """How far the decay is (0 to 1) at update s (1-based), past warm-up."""
        done = (s - self.anchor_step) / max(self.end - self.anchor_step, 1)
        return min(self.anchor_progress + (1.0 - self.anchor_progress) * done, 1.0)

    def __call__(self, step: int) -> float:
        s = step + 1
        if s <= self.warmup_steps:
            return s / self.warmup_steps
        done = self.progress(s)
        return 1.0 - done if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def aim(self, done: int, end: int) -> None:
        """Reach zero at update `end` (> done), continuing from where update `done` was;
        `done` must be past warm-up."""
        if done < self.warmup_steps or end <= done:
            raise ValueError(f"cannot aim a decay at {end} after {done} updates")
        self.anchor_progress = self.progress(done)
        self.anchor_step = done
        self.end = end


def schedule_factor(cfg: OptimConfig, max_steps: int | None = None):
    """The per-step multiplier of the peak lr that `cfg` names: a function for inverse_sqrt,
    a `Decay` for linear and cosine."""
    if cfg.schedule == "inverse_sqrt":
        return lambda step: inverse_sqrt_factor(step, cfg.warmup_steps)
    decay_steps = cfg.decay_steps or max_steps
    if decay_steps is None or decay_steps <= 0:
        raise ValueError(
            f"optim.schedule={cfg.schedule} decays to zero at a known step: set "
            "optim.decay_steps or trainer.max_steps"
        )
    return Decay(cfg.warmup_steps, decay_steps, cfg.schedule)


#: Devices on which torch's Adam has a fused kernel (one pass over each parameter).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    cfg: OptimConfig,
    d_model: int,
    max_steps: int | None = None,
    fused: bool = True,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam (AdamW when weight_decay > 0) and its per-step schedule; `max_steps` is where a
    linear/cosine decay ends when `cfg.decay_steps` is None.

    `fused`: torch's fused kernel where every parameter is a float tensor on a device that has
    one (on a CPU it is one pass per parameter instead of a dozen elementwise ops)."""
    params = list(params)
    fused = fused and all(
        p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params
    )
    kind = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    optimizer = kind(
        params,
        lr=peak_lr(cfg, d_model),
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, max_steps))
    return optimizer, schedule
