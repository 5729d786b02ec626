"""The CPU dropout: nn.Dropout's distribution, scaling and gradient, drawn more cheaply."""

import pytest
import torch

from seq2seq.kernels.dropout import Dropout


def test_keeps_one_minus_p_of_the_units_scaled_by_one_over_one_minus_p():
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = Dropout(0.3)(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    keep_probability = 1 - round(0.3 * 2**16) / 2**16  # p on a grid of 2^-16
    assert keep_probability == pytest.approx(0.7, abs=2**-17)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / keep_probability))


def test_every_16_bit_lane_of_the_random_words_keeps_units_alike():
    # Each 64-bit word decides four consecutive units; a lane with a stuck bit (a 63-bit draw)
    # would keep its units at another rate.
    torch.manual_seed(0)
    kept = Dropout(0.5)(torch.ones(1_000_000)) != 0
    for lane in range(4):
        assert kept[lane::4].float().mean().item() == pytest.approx(0.5, abs=0.005)


def test_expectation_is_the_input_for_a_p_off_the_16_bit_grid():
    torch.manual_seed(2)
    x = torch.ones(4_000_000, dtype=torch.float64)
    assert Dropout(0.123457)(x).mean().item() == pytest.approx(1.0, abs=0.002)
    almost_all = Dropout(1 - 1e-7)  # rounds past the grid: falls back to nn.functional.dropout
    assert (almost_all(torch.ones(1000)) == 0).all()


def test_gradient_flows_only_through_kept_units_with_the_same_scale():
    torch.manual_seed(1)
    x = torch.randn(50, 40, requires_grad=True)
    y = Dropout(0.25)(x)
    upstream = torch.randn(50, 40)
    y.backward(upstream)
    kept = y != 0
    torch.testing.assert_close(x.grad, upstream * kept / (1 - round(0.25 * 2**16) / 2**16))


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
