"""The oneDNN swaps (CPU, float32) compute what the plain layers compute, gradients included,
step aside wherever they do not apply, and fall back with one warning when torch's private op
is missing or has changed."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seq2seq.kernels.onednn as onednn
from seq2seq.config import preset
from seq2seq.kernels import for_cpu_training
from seq2seq.kernels.onednn import OneDnnLinear, PackedLinear, use_onednn_linears
from seq2seq.nn.loss import translation_loss
from seq2seq.nn.transformer import FeedForward, Transformer

needs_onednn = pytest.mark.skipif(not onednn.onednn_works(), reason="torch without oneDNN")


@pytest.fixture
def fresh_probes():
    """The probes' cached answers are cleared before and after (they are per process)."""
    probes = (onednn.onednn_works, onednn.packing_works, onednn.bf16_packing_works)
    for probe in probes:
        probe.cache_clear()
    yield
    for probe in probes:
        probe.cache_clear()


def layer_and_input(dtype=torch.float32):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    return layer, x


def output_and_grads(module, layer, x):
    layer.zero_grad()
    x.grad = None
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
def test_a_onednn_linear_and_its_gradients_equal_nn_linears(relu):
    layer, x = layer_and_input()
    fast = output_and_grads(OneDnnLinear.of(layer, relu=relu), layer, x)
    plain = nn.Sequential(layer, nn.ReLU()) if relu else layer
    reference = output_and_grads(plain, layer, x)
    if relu:
        assert (fast[0] == 0).any() and (fast[0] > 0).any()  # both sides of the ReLU occur
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inference_float64_and_autocast_run_torchs_own_kernel(monkeypatch):
    layer, x = layer_and_input()
    fast = OneDnnLinear.of(layer, relu=True)
    monkeypatch.setattr(onednn, "_op", lambda name: None)  # would fail if the op were called
    with torch.inference_mode():
        assert torch.equal(fast(x), F.relu(layer(x)))
    layer64, x64 = layer_and_input(torch.float64)
    assert torch.equal(OneDnnLinear.of(layer64)(x64), layer64(x64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), F.relu(layer(x)))


def test_the_swap_keeps_parameters_and_state_dict_and_fuses_the_ffn_relu():
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30))
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    swapped = use_onednn_linears(model) if onednn.onednn_works() else 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert [id(p) for p in model.parameters()] == params  # the optimizer sees the same tensors
    if swapped:
        ffn = next(m for m in model.modules() if isinstance(m, FeedForward))
        assert ffn.w1.relu and isinstance(ffn.activation, nn.Identity) and not ffn.w2.relu
        assert not any(type(m) is nn.Linear for m in model.modules())


@needs_onednn
def test_a_training_step_with_the_kernels_swapped_in_gives_the_same_loss_and_gradients():
    cfg = preset("tiny", src_vocab_size=30, tgt_vocab_size=30, dropout=0.0)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fast = Transformer(cfg)
    fast.load_state_dict(plain.state_dict())
    assert for_cpu_training(fast, "cpu")  # something was swapped
    src = torch.randint(4, 30, (3, 7))
    tgt = torch.randint(4, 30, (3, 6))
    results = []
    for model in (plain, fast):
        loss = translation_loss(model, src, tgt, tgt, 0.1).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_for_cpu_training_changes_nothing_on_other_devices():
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30))
    assert for_cpu_training(model, "cuda") == []
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())


def test_a_missing_op_leaves_the_plain_layers_with_one_warning(monkeypatch, fresh_probes):
    monkeypatch.delattr(torch.ops.mkldnn, "_linear_pointwise", raising=False)
    monkeypatch.setattr(onednn, "_op", lambda name: None)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30))
    with pytest.warns(RuntimeWarning, match="_linear_pointwise") as caught:
        assert use_onednn_linears(model) == 0
        assert not onednn.use_packed_projection(model)
        assert onednn.use_packed_bf16_decoder(model.to(torch.bfloat16)) == 0
    assert len(caught) == 1  # one warning, however often it is asked
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())


def test_an_op_whose_signature_changed_leaves_the_plain_layers(monkeypatch, fresh_probes):
    def changed(x, weight, bias, attr):  # one argument fewer than this module passes
        return F.linear(x, weight, bias)

    real = onednn._op
    monkeypatch.setattr(
        onednn, "_op", lambda name: changed if name == "_linear_pointwise" else real(name)
    )
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30))
    with pytest.warns(RuntimeWarning, match="_linear_pointwise"):
        assert use_onednn_linears(model) == 0


def test_seq2seq_onednn_0_turns_the_swaps_off():
    code = (
        "import warnings; warnings.simplefilter('error');"
        "from seq2seq.kernels.onednn import onednn_works; print(onednn_works())"
    )
    env = {**os.environ, "SEQ2SEQ_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@needs_onednn
def test_a_packed_projection_gives_f_linear_for_every_row_count():
    if not onednn.packing_works():
        pytest.skip("torch without oneDNN weight packing")
    torch.manual_seed(0)
    weight, bias = torch.randn(50, 16), torch.randn(50)
    packed = PackedLinear(weight, bias)
    with torch.inference_mode():
        for rows in (1, 2, 7, 16, 17, 33, 300, 1025):  # exact and padded (row_bucket) counts
            x = torch.randn(rows, 16)
            torch.testing.assert_close(packed(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, 3, 16)
        torch.testing.assert_close(packed(x3), F.linear(x3, weight, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
def test_a_packed_bf16_layer_gives_f_linear_and_its_relu_for_every_row_count(relu):
    if not onednn.bf16_packing_works():
        pytest.skip("torch without oneDNN bf16 weight packing")
    torch.manual_seed(0)
    weight, bias = torch.randn(50, 16).bfloat16(), torch.randn(50).bfloat16()
    packed = PackedLinear(weight, bias, relu=relu)
    with torch.inference_mode():
        for rows in (1, 7, 17, 33, 300):  # exact and padded (row_bucket) counts
            x = torch.randn(rows, 16).bfloat16()
            want = F.linear(x, weight, bias)
            want = want.relu() if relu else want
            got = packed(x)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)
            if relu:
                assert (got == 0).any() and (got > 0).any()


def test_bf16_translators_pack_the_per_step_layers_unless_asked_not_to(checkpoint):
    """In bf16 the decoder layers' per-step linear layers (not the cross-attention's key/value
    projection, once per batch) and the output projection become PackedLinears with the FFN's
    ReLU fused; the translations are the plain bf16 model's."""
    from seq2seq.inference.translator import Translator

    packed = Translator.load(checkpoint, "cpu", "bf16")
    plain = Translator.load(checkpoint, "cpu", "bf16", pack_weights=False)
    assert type(plain.models[0].generator) is nn.Linear
    if onednn.bf16_packing_works():
        model = packed.models[0]
        layer = model.decoder_layers[0]
        assert isinstance(model.generator, PackedLinear)
        assert (
            isinstance(layer.self_attn.qkv, PackedLinear) and type(layer.cross_attn.kv) is nn.Linear
        )
        assert layer.ffn.w1.relu and type(layer.ffn.activation) is nn.Identity
        assert not any(isinstance(m, PackedLinear) for m in model.encoder_layers.modules())
    lines = ["A dog runs on the grass.", "Two men are talking.", "A child plays."]
    assert packed.translate(lines, beam=1) == plain.translate(lines, beam=1)
    assert packed.translate(lines, beam=3) == plain.translate(lines, beam=3)


def test_row_buckets_cover_every_count_with_few_kernels_and_little_padding():
    counts = range(1, 4097)
    buckets = [onednn.row_bucket(m) for m in counts]
    assert all(b >= m for b, m in zip(buckets, counts, strict=True))
    assert buckets[:16] == list(range(1, 17))  # small counts (greedy on a few lines) are exact
    assert max(b / m for b, m in zip(buckets, counts, strict=True)) < 1.25
    assert len(set(buckets)) == 16 + 4 * 8  # 4 per power of two above 16 (17..4096)
    assert all(onednn.row_bucket(b) == b for b in buckets)  # a bucket is its own bucket


def test_translators_pack_the_projection_unless_asked_not_to(checkpoint, monkeypatch):
    from seq2seq.inference import translate
    from seq2seq.inference.translator import Translator

    monkeypatch.setattr(translate, "cpu_is_intel", lambda: False)  # oneDNN's projection

    packed = Translator.load(checkpoint, "cpu", "fp32")
    plain = Translator.load(checkpoint, "cpu", "fp32", pack_weights=False)
    assert type(plain.models[0].generator) is nn.Linear
    if onednn.packing_works():
        assert isinstance(packed.models[0].generator, PackedLinear)
    lines = ["A dog runs on the grass.", "Two men are talking."]
    assert packed.translate(lines, beam=1) == plain.translate(lines, beam=1)


def test_decoding_with_the_packed_projection_gives_the_same_logits(monkeypatch):
    from seq2seq.inference import translate
    from seq2seq.inference.translate import prepare_model

    monkeypatch.setattr(translate, "cpu_is_intel", lambda: False)  # oneDNN's projection

    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).eval()
    states = torch.randn(4, 32)
    with torch.inference_mode():
        want = model.project(states)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_model(model, "cpu", "fp32", pack_weights=True)
        assert isinstance(prepared.generator, PackedLinear) or not onednn.packing_works()
        torch.testing.assert_close(prepared.project(states), want, rtol=1e-5, atol=1e-5)


def test_probing_the_ops_leaves_torchs_random_stream_alone(fresh_probes):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    onednn.onednn_works()
    onednn.packing_works()
    onednn.bf16_packing_works()
    assert torch.equal(torch.rand(3), expected)
