"""The learning-rate schedule is the paper's equation 3."""

import pytest
import torch

from seq2seq.config import OptimConfig
from seq2seq.optim import build_optimizer, inverse_sqrt_factor, peak_lr


def paper_lrate(step: int, d_model: int, warmup: int) -> float:
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def test_schedule_equals_equation_3_of_the_paper():
    cfg = OptimConfig(warmup_steps=4000)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = build_optimizer([param], cfg, d_model=512)
    for step in range(1, 12001):
        lr = optimizer.param_groups[0]["lr"]
        if step in (1, 2, 100, 3999, 4000, 4001, 8000, 12000):
            assert lr == pytest.approx(paper_lrate(step, 512, 4000), rel=1e-9)
        optimizer.step()
        schedule.step()


def test_peak_lr_form_peaks_at_the_end_of_warmup():
    cfg = OptimConfig(lr=5e-4, warmup_steps=100)
    assert peak_lr(cfg, 512) == 5e-4
    factors = [inverse_sqrt_factor(s, 100) for s in range(400)]
    assert max(factors) == factors[99] == 1.0
    assert factors[399] == pytest.approx(0.5)  # sqrt(100 / 400)


def test_adam_uses_the_paper_betas_and_weight_decay_switches_to_adamw():
    param = torch.nn.Parameter(torch.zeros(1))
    adam, _ = build_optimizer([param], OptimConfig(), 512)
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.9, 0.98) and adam.defaults["eps"] == 1e-9
    adamw, _ = build_optimizer([param], OptimConfig(weight_decay=0.01), 512)
    assert type(adamw) is torch.optim.AdamW
