"""The CPU dropout: nn.Dropout's distribution, scaling and gradient, drawn more cheaply."""

import pytest
import torch

from seq2seq.dropout import Dropout


def test_keeps_one_minus_p_of_the_units_scaled_by_one_over_one_minus_p():
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = Dropout(0.3)(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))


def test_gradient_flows_only_through_kept_units_with_the_same_scale():
    torch.manual_seed(1)
    x = torch.randn(50, 40, requires_grad=True)
    y = Dropout(0.25)(x)
    upstream = torch.randn(50, 40)
    y.backward(upstream)
    kept = y != 0
    torch.testing.assert_close(x.grad, upstream * kept / 0.75)


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(6, 7)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0)(x) is x


def test_same_seed_same_mask_so_resumed_runs_replay_exactly():
    x = torch.randn(30, 30)
    torch.manual_seed(5)
    a = Dropout(0.4)(x)
    torch.manual_seed(5)
    b = Dropout(0.4)(x)
    assert torch.equal(a, b)
