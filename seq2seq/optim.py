"""Adam with the inverse-square-root warm-up schedule ("Attention Is All You Need", eq. 3).

    lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)

The same curve can be given by its peak instead: lr(step) = peak * min(step / warmup,
sqrt(warmup / step)), with peak = d_model^-0.5 * warmup^-0.5 for the paper's setting.
"""

from __future__ import annotations

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


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, d_model: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam (AdamW when weight_decay > 0) and its per-step schedule."""
    kind = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    optimizer = kind(
        params,
        lr=peak_lr(cfg, d_model),
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt_factor(step, cfg.warmup_steps)
    )
    return optimizer, schedule
