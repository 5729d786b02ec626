"""The learning-rate schedule is the paper's equation 3."""

import pytest
import torch

from seq2seq.config import OptimConfig
from seq2seq.training.optim import Decay, build_optimizer, inverse_sqrt_factor, peak_lr


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


def test_fused_adam_takes_the_same_steps_as_the_unfused_one():
    torch.manual_seed(0)
    start, grads = torch.randn(50), [torch.randn(50) for _ in range(5)]
    params = {}
    for fused in (True, False):
        param = torch.nn.Parameter(start.clone())
        optimizer, schedule = build_optimizer(
            [param], OptimConfig(warmup_steps=2), 512, fused=fused
        )
        assert optimizer.defaults["fused"] is (True if fused else None)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
            schedule.step()
        params[fused] = param.detach()
    assert not torch.equal(params[True], start)
    torch.testing.assert_close(params[True], params[False], rtol=1e-6, atol=1e-7)


def test_fused_adam_is_used_only_where_every_parameter_allows_it():
    double = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert build_optimizer([double], OptimConfig(), 512)[0].defaults["fused"] is True
    assert build_optimizer([double, on_meta], OptimConfig(), 512)[0].defaults["fused"] is None


def lrs(cfg: OptimConfig, steps: int, max_steps: int | None = None) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = build_optimizer([param], cfg, 512, max_steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_linear_schedule_warms_up_then_falls_to_zero_at_decay_steps():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="linear", decay_steps=110)
    lr = lrs(cfg, 130)
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # update 10 = peak
    assert lr[59] == pytest.approx(0.5e-3)  # halfway through the decay
    assert lr[108] == pytest.approx(1e-5) and lr[109] == 0.0 and lr[129] == 0.0
    assert lr[9:] == sorted(lr[9:], reverse=True)  # never rises after the peak


def test_cosine_schedule_is_half_way_down_at_the_midpoint_and_zero_at_the_end():
    assert Decay(10, 110, "cosine")(59) == pytest.approx(0.5)
    assert Decay(10, 110, "cosine")(34) == pytest.approx(0.5 * (1 + 2**-0.5))
    assert Decay(10, 110, "cosine")(109) == pytest.approx(0.0)
    assert Decay(10, 110, "cosine")(4) == pytest.approx(0.5)  # warm-up is linear


def test_decay_ends_at_max_steps_when_decay_steps_is_unset():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="linear")
    assert lrs(cfg, 60, max_steps=50)[49:] == [0.0] * 11
    assert lrs(cfg, 5, max_steps=5) == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])  # smoke run
    with pytest.raises(ValueError, match="set optim.decay_steps or trainer.max_steps"):
        lrs(cfg, 1, max_steps=-1)  # Lightning's "unbounded"


def test_bad_schedule_settings_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="optim.schedule='noam' must be one of"):
        OptimConfig(schedule="noam")
    with pytest.raises(ValueError, match="optim.decay_steps=100 must exceed optim.warmup_steps"):
        OptimConfig(warmup_steps=100, schedule="linear", decay_steps=100)


def test_an_aimed_decay_goes_on_from_where_it_was_to_zero_at_its_new_end():
    plain, aimed = Decay(10, 110, "linear"), Decay(10, 110, "linear")
    aimed.aim(50, 70)  # after 50 updates, on a machine that reaches only 70 in its time
    # Update 50 (step 49) is where it was: 40 of the planned 100 decay updates done.
    assert aimed(49) == pytest.approx(plain(49)) == pytest.approx(0.6)
    assert aimed(59) == pytest.approx(0.3)  # half-way from 0.6 to zero
    assert aimed(69) == 0.0 and aimed(90) == 0.0
    steps = [plain(s) for s in range(9, 49)] + [aimed(s) for s in range(49, 110)]
    assert steps == sorted(steps, reverse=True)  # no jump up where it was aimed
    cosine = Decay(10, 110, "cosine")
    cosine.aim(60, 80)
    assert cosine(59) == pytest.approx(0.5) and cosine(79) == 0.0
    with pytest.raises(ValueError, match="cannot aim a decay at 40 after 50 updates"):
        aimed.aim(50, 40)


def test_a_decays_aim_survives_a_checkpoint_and_a_new_plan_starts_over(tmp_path):
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="linear")
    param = torch.nn.Parameter(torch.zeros(1))
    _, schedule = build_optimizer([param], cfg, 512, 110)
    schedule.lr_lambdas[0].aim(50, 70)
    torch.save(schedule.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # plain numbers only
    for plan, end in ((110, 70), (200, 200)):
        _, resumed = build_optimizer([param], cfg, 512, 110)
        resumed.load_state_dict(state)
        resumed.lr_lambdas[0].replan(plan)
        assert resumed.lr_lambdas[0].end == end
    assert resumed.lr_lambdas[0](104) == pytest.approx(0.5)  # the 200-step plan, unaimed


def test_the_decay_end_is_aimed_where_the_time_budget_runs_out():
    from seq2seq.training.budget import aimed_end

    assert aimed_end(100, 200.0, 600.0, 5000) == 300  # 2 s an update: 200 more in 400 s
    assert aimed_end(100, 20.0, 600.0, 5000) == 3000
    assert aimed_end(100, 10.0, 600.0, 5000) == 5000  # fast enough for max_steps
    assert aimed_end(100, 700.0, 600.0, 5000) == 101  # over budget already: the next update
    assert aimed_end(0, 0.0, 600.0, 5000) == 5000


def test_decay_within_time_needs_a_decay_that_ends():
    with pytest.raises(ValueError, match="optim.decay_within_time needs optim.schedule"):
        OptimConfig(schedule="inverse_sqrt", decay_within_time=True)


def test_the_decay_is_reaimed_each_interval_later_again_if_the_run_speeds_up(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from seq2seq.training.budget import DecayWithinTime

    decay, timer, clock = Decay(10, 100, "linear"), Timer(duration={"seconds": 100}), [0.0]
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": clock[0])
    scheduler = SimpleNamespace(lr_lambdas=[decay])
    trainer = SimpleNamespace(
        callbacks=[timer],
        global_step=0,
        should_stop=False,
        lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
        strategy=SimpleNamespace(broadcast=lambda x: x),  # rank 0's clock
    )
    callback = DecayWithinTime(interval=10, budget_s=100)

    def end_after(step: int, seconds: float) -> int:
        trainer.global_step, clock[0] = step, seconds
        callback.on_train_batch_end(trainer, None, None, None, 0)
        return decay.end

    assert end_after(5, 10.0) == 100  # in warm-up: untouched
    assert end_after(10, 20.0) == 50  # 2 s an update: 40 more in the 80 s left
    assert end_after(15, 21.0) == 50  # between intervals: untouched
    assert end_after(20, 30.0) == 66  # faster: later again
    assert end_after(40, 36.0) == 100  # never past max_steps
    assert end_after(50, 90.0) == 55 and not trainer.should_stop
    end_after(55, 99.0)
    assert trainer.should_stop  # the decay ended before max_steps: stop


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"warmup_steps": -10}, "optim.warmup_steps=-10 must be >= 0"),
        ({"lr": 1e-3, "warmup_steps": -10}, "optim.warmup_steps=-10 must be >= 0"),
        ({"warmup_steps": 0}, "optim.warmup_steps=0 needs an optim.lr: the paper's peak lr "),
        ({"label_smoothing": 1.5}, "optim.label_smoothing=1.5 must be in [0, 1)"),
        ({"label_smoothing": -0.5}, "optim.label_smoothing=-0.5 must be in [0, 1)"),
        ({"label_smoothing": 1.0}, "optim.label_smoothing=1.0 must be in [0, 1)"),
        ({"lr": 0.0}, "optim.lr=0.0 must be a positive number"),
        ({"lr": -0.001}, "optim.lr=-0.001 must be a positive number"),
        ({"lr_scale": float("nan")}, "optim.lr_scale=nan must be a positive number"),
    ],
)
def test_a_warmup_lr_or_label_smoothing_that_cannot_train_is_refused_naming_the_key(
    settings, message
):
    """Not a ZeroDivisionError in peak_lr, a complex lr in Adam, or a run that trains anyway."""
    with pytest.raises(ValueError) as err:
        OptimConfig(**settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_no_warmup_is_allowed_where_the_peak_lr_is_given():
    cfg = OptimConfig(lr=1e-3, warmup_steps=0)  # inverse_sqrt_factor: lr * step^-0.5 from step 1
    assert lrs(cfg, 4) == pytest.approx([1e-3 * s**-0.5 for s in (1, 2, 3, 4)])
    assert lrs(OptimConfig(lr=1e-3, warmup_steps=0, schedule="linear"), 2, max_steps=4) == (
        pytest.approx([7.5e-4, 5e-4])
    )
