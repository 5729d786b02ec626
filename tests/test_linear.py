"""The oneDNN linear path (CPU, float32) computes what nn.Linear computes, gradients included,
and steps aside wherever it does not apply."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq import linear as linear_module
from seq2seq.config import preset
from seq2seq.linear import linear, pack, packed_matmul_t, uses_onednn
from seq2seq.loss import translation_loss
from seq2seq.model import Transformer

needs_onednn = pytest.mark.skipif(not linear_module.ENABLED, reason="torch without oneDNN")


def layer_and_input(dtype=torch.float32):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    return layer, x


def output_and_grads(fn, layer, x):
    layer.zero_grad()
    x.grad = None
    y = fn(layer, x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
def test_onednn_linear_and_its_gradients_equal_nn_linear(relu):
    layer, x = layer_and_input()
    assert uses_onednn(x, layer.weight)
    fast = output_and_grads(lambda m, v: linear(m, v, relu=relu), layer, x)
    reference = output_and_grads(lambda m, v: F.relu(m(v)) if relu else m(v), layer, x)
    if relu:
        assert (fast[0] == 0).any() and (fast[0] > 0).any()  # both sides of the ReLU occur
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inference_runs_the_layers_own_forward(monkeypatch):
    layer, x = layer_and_input()
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", None)  # would fail if called
    with torch.inference_mode():
        got, want = linear(layer, x, relu=True), F.relu(layer(x))
    assert got.shape == (3, 5, 40)
    assert torch.equal(got, want)


def test_float64_autocast_and_hooked_layers_run_the_layers_own_forward():
    layer, x = layer_and_input(torch.float64)
    assert not uses_onednn(x, layer.weight)
    assert torch.equal(linear(layer, x, relu=True), F.relu(layer(x)))
    layer, x = layer_and_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, layer.weight)
        assert linear(layer, x).dtype == torch.bfloat16  # autocast applied to the matmul
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    linear(layer, x)
    assert seen == [torch.Size([3, 5, 40])]


@needs_onednn
def test_a_training_step_through_onednn_gives_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    cfg = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    model = Transformer(cfg).train()
    src = torch.randint(4, 40, (3, 7))
    src[0, 4:] = cfg.pad_id  # padding: the encoder's packed path too
    tgt = torch.randint(4, 40, (3, 6))

    def loss_and_grads():
        model.zero_grad()
        loss = translation_loss(model, src, tgt, tgt, 0.1).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or pointwise(*a)
    )
    fast_loss, fast_grads = loss_and_grads()
    assert len(calls) > 0
    monkeypatch.setattr(linear_module, "ENABLED", False)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_seq2seq_onednn_0_turns_the_path_off():
    code = "from seq2seq import linear; print(linear.ENABLED)"
    env = {**os.environ, "SEQ2SEQ_ONEDNN": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def count_packings(monkeypatch) -> list:
    packings = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(
        torch.ops.mkldnn,
        "_reorder_linear_weight",
        lambda *a: packings.append(1) or reorder(*a),
    )
    return packings


@needs_onednn
def test_a_packed_weight_gives_f_linear_for_every_row_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 24), torch.randn(300)
    with torch.inference_mode():
        packed = pack(weight, torch.randn(1, 24))
        assert packed.is_mkldnn
        for rows in (1, 7, 64, 7):  # the row count changes as sentences finish
            x = torch.randn(rows, 1, 24)
            got = packed_matmul_t(x, packed, bias)
            assert got.shape == (rows, 1, 300)
            torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_without_onednn_or_with_gradients_the_weight_stays_as_it_is():
    torch.manual_seed(0)
    weight = torch.randn(30, 8, requires_grad=True)
    x = torch.randn(4, 8)
    assert pack(weight, x) is weight  # gradients wanted
    got = packed_matmul_t(x, pack(weight, x))
    assert got.requires_grad and torch.equal(got, F.linear(x, weight))
    with torch.inference_mode():
        assert pack(weight.double(), x.double()).dtype == torch.float64  # not oneDNN's case
        bf16 = weight.detach().bfloat16()
        assert pack(bf16, x.bfloat16()) is bf16


@needs_onednn
def test_each_search_packs_the_current_output_weights_once(monkeypatch):
    """Validation decodes between updates (fused Adam changes the weights without bumping
    their version): every search packs the weights as they are then, once."""
    packings = count_packings(monkeypatch)
    torch.manual_seed(0)
    cfg = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    model = Transformer(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    src, tgt = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 6))
    for search in range(2):
        model.eval()
        with torch.inference_mode():
            memory, cache = model.encode(src), model.new_cache()
            steps = [model.decode_step(tgt[:, t : t + 1], memory, cache) for t in range(3)]
            states = model.decode(tgt[:, :3], model.encode(src))
            want = F.linear(states, model.output_projection()[0])
        assert len(packings) == search + 1
        torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-4, atol=1e-5)
        model.train()
        translation_loss(model, src, tgt, tgt, 0.1).loss.backward()
        optimizer.step()  # changes the tied weights in place
