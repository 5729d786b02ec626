"""The MKL-packed decoder layers (CPU, float32, decoding) compute what the plain layers
compute at every row count, keep the model's state_dict, swap only the layers that run at
every step, and step aside where torch has no usable MKL ops."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seq2seq.kernels.mkl as mkl
from seq2seq.config import preset
from seq2seq.kernels.mkl import MklPackedLinear, use_mkl_packed_decoder
from seq2seq.nn.transformer import Transformer

needs_mkl = pytest.mark.skipif(not mkl.mkl_packing_works(), reason="torch without MKL packing")


@pytest.fixture
def fresh_probe():
    mkl.mkl_packing_works.cache_clear()
    yield
    mkl.mkl_packing_works.cache_clear()


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", src_vocab_size=40, tgt_vocab_size=40)).eval()


@needs_mkl
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_gives_f_linear_for_every_row_count(relu, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 70, bias=bias)
    packed = MklPackedLinear(layer, relu=relu)

    def want(x):
        y = F.linear(x, layer.weight, layer.bias)
        return y.relu() if relu else y

    with torch.inference_mode():
        for rows in (1, 2, 15, 16, 17, 255, 256, 257, 1000):  # below, at, above the pack hint
            x = torch.randn(rows, 48)
            torch.testing.assert_close(packed(x), want(x), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(4, 3, 48)
        assert packed(x3).shape == (4, 3, 70)
        torch.testing.assert_close(packed(x3), want(x3), rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 48, requires_grad=True)  # autograd: the plain layer, gradients flow
    packed(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@needs_mkl
def test_only_the_decoder_layers_per_step_linears_are_swapped_and_the_state_dict_is_kept():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = len(model.decoder_layers)
    assert use_mkl_packed_decoder(model) == 6 * n_layers  # qkv, out, q, out, w1, w2
    for layer in model.decoder_layers:
        assert isinstance(layer.self_attn.qkv, MklPackedLinear)
        assert isinstance(layer.cross_attn.q, MklPackedLinear)
        assert type(layer.cross_attn.kv) is nn.Linear  # once per batch, on the encoder output
        assert layer.ffn.w1.relu and type(layer.ffn.activation) is nn.Identity
        assert not layer.ffn.w2.relu
    assert not any(isinstance(m, MklPackedLinear) for m in model.encoder_layers.modules())
    assert type(model.generator) is nn.Linear  # unless asked (projection=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@needs_mkl
def test_decoding_with_packed_decoder_layers_gives_the_same_logits():
    plain, packed = tiny_model(), tiny_model()
    assert use_mkl_packed_decoder(packed, projection=True) > 0
    src = torch.randint(4, 40, (6, 9))
    src[0, 5:] = 0  # padding
    steps = torch.randint(4, 40, (6, 7))
    with torch.inference_mode():
        outs = []
        for model in (plain, packed):
            memory, cache = model.encode(src), model.new_cache()
            logits = [model.decode_step(steps[:, t : t + 1], memory, cache) for t in range(7)]
            outs.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intel", [True, False])
def test_translators_pack_the_decoder_unless_asked_not_to(checkpoint, monkeypatch, intel):
    """And the output projection on MKL on an Intel CPU, on oneDNN elsewhere."""
    from seq2seq.inference import translate
    from seq2seq.inference.translator import Translator
    from seq2seq.kernels import onednn

    monkeypatch.setattr(translate, "cpu_is_intel", lambda: intel)
    packed = Translator.load(checkpoint, "cpu", "fp32")
    plain = Translator.load(checkpoint, "cpu", "fp32", pack_weights=False)
    assert not any(isinstance(m, MklPackedLinear) for m in plain.models[0].modules())
    if mkl.mkl_packing_works():
        assert isinstance(packed.models[0].decoder_layers[0].ffn.w1, MklPackedLinear)
        generator = packed.models[0].generator
        assert isinstance(generator, MklPackedLinear) == intel
        assert isinstance(generator, onednn.PackedLinear) == (not intel and onednn.packing_works())
    lines = ["A dog runs on the grass.", "Two men are talking.", "A girl in a red coat."]
    for beam in (1, 4):
        assert packed.translate(lines, beam=beam) == plain.translate(lines, beam=beam)


def test_without_the_ops_the_model_keeps_its_plain_layers(monkeypatch, fresh_probe):
    monkeypatch.setattr(mkl, "_op", lambda name: None)
    model = tiny_model()
    assert not mkl.mkl_packing_works()
    assert use_mkl_packed_decoder(model, projection=True) == 0
    assert not any(isinstance(m, MklPackedLinear) for m in model.modules())


def test_ops_that_compute_something_else_warn_once_and_are_not_used(monkeypatch, fresh_probe):
    real = mkl._op
    wrong = lambda x, packed, w, b, rows: F.linear(x, w)  # noqa: E731  (drops the bias)
    monkeypatch.setattr(mkl, "_op", lambda name: wrong if name == "_mkl_linear" else real(name))
    if real("_mkl_linear") is None or not torch.backends.mkl.is_available():
        pytest.skip("torch without MKL")
    with pytest.warns(RuntimeWarning, match="_mkl_linear") as caught:
        assert use_mkl_packed_decoder(tiny_model()) == 0
        assert use_mkl_packed_decoder(tiny_model()) == 0
    assert len(caught) == 1


def test_seq2seq_mkl_pack_0_turns_it_off():
    code = "from seq2seq.kernels.mkl import mkl_packing_works; print(mkl_packing_works())"
    env = {**os.environ, "SEQ2SEQ_MKL_PACK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_probing_leaves_torchs_random_stream_alone(fresh_probe):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    mkl.mkl_packing_works()
    assert torch.equal(torch.rand(3), expected)


def test_an_intel_cpu_is_told_by_its_vendor_id():
    from seq2seq.kernels.cpu import cpu_is_intel

    assert cpu_is_intel("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: fpu\n")
    assert not cpu_is_intel("processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert not cpu_is_intel("")  # not Linux, or no /proc/cpuinfo
