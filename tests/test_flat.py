"""The flat decoding step gives bitwise the model's states at every step (post-norm and
pre-norm, packed and plain layers, greedy and beam reorders), searches through it give the
model's hypotheses, and every other step goes through the model itself."""

import dataclasses

import pytest
import torch
from torch import nn

from seq2seq.config import DecodeConfig, preset
from seq2seq.inference.flat import FlatDecoder, flat_decoder
from seq2seq.inference.search import BOS, PAD, search
from seq2seq.inference.translate import prepare_model
from seq2seq.inference.translator import Translator
from seq2seq.nn.transformer import DecoderLayer, Transformer

V = 50


def model_of(pre_norm: bool, packed: bool, seed: int = 0, precision: str = "fp32") -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", src_vocab_size=V, tgt_vocab_size=V, pre_norm=pre_norm)
    model = Transformer(cfg)
    for p in model.parameters():  # away from the initial zeros (biases) and small weights
        nn.init.normal_(p, std=0.3)
    return prepare_model(model, "cpu", precision, pack_weights=packed)


def sources(rows: int = 6, seed: int = 1) -> torch.Tensor:
    """Right-padded sources of different lengths."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (rows, 9), generator=g)
    for i in range(rows):
        src[i, 3 + i % 6 :] = PAD
    return src


class Spy:
    """Counts the calls of a model's own decode."""

    def __init__(self, model: Transformer):
        self.calls, self.decode = 0, model.decode
        model.decode = self

    def __call__(self, *args):
        self.calls += 1
        return self.decode(*args)


@pytest.mark.parametrize(
    "precision, packed", [("fp32", True), ("fp32", False), ("bf16", True), ("int8", False)]
)
@pytest.mark.parametrize("pre_norm", [False, True])
def test_every_step_gives_bitwise_the_models_states_through_reorders(pre_norm, precision, packed):
    """Packed float32 layers are called through MKL's op; plain ones through F.linear; bf16's
    packed oneDNN layers and int8's quantized ones as modules."""
    model = model_of(pre_norm, packed, precision=precision)
    flat = flat_decoder(model)
    assert isinstance(flat, FlatDecoder)
    spy = Spy(model)
    src = sources()
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        memory = model.encode(src)
        caches = {"model": model.new_cache(4), "flat": model.new_cache(4)}  # grows past 4
        decoders = {"model": model, "flat": flat}
        tokens = torch.full((src.size(0), 1), BOS)
        rows = torch.arange(src.size(0))
        for step in range(9):
            states = {
                name: decoders[name].decode(tokens, memory, caches[name]) for name in decoders
            }
            assert states["flat"].shape == (rows.numel(), 1, model.cfg.d_model)
            assert torch.equal(states["flat"], states["model"]), f"step {step}"
            assert torch.equal(
                flat.project(states["flat"][:, 0]), model.project(states["model"][:, 0])
            )
            tokens = torch.randint(4, V, (rows.numel(), 1), generator=g)
            if step in (2, 5):  # sentences end: the rest move up, as greedy search keeps them
                keep = torch.arange(rows.numel() - 1, 0, -2).flip(0)
                for cache in caches.values():
                    cache.reorder(keep)
                memory, tokens, rows = memory.select(keep), tokens[keep], rows[keep]
        assert spy.calls == 9 + 1  # the model's own steps, and the flat decoder's first
        for a, b in zip(caches["flat"].layers, caches["model"].layers, strict=True):
            T = a.self_length
            assert T == b.self_length == 9
            assert torch.equal(a.self_k[:T, : rows.numel()], b.self_k[:T, : rows.numel()])


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("beam", [1, 4])
def test_searches_through_the_flat_decoder_give_the_models_hypotheses(pre_norm, beam):
    model = model_of(pre_norm, packed=True, seed=3)
    cfg = DecodeConfig(beam=beam, nbest=min(beam, 2), lenpen=1.0, max_len_a=1.0, max_len_b=4)
    src = sources(rows=7, seed=4)
    want = search(model, src, cfg, model.cfg.max_positions)
    spy = Spy(model)
    got = search(flat_decoder(model), src, cfg, model.cfg.max_positions)
    assert spy.calls == 1  # every step after the first ran flat
    assert [[(h.tokens, h.score) for h in hyps] for hyps in got] == [
        [(h.tokens, h.score) for h in hyps] for hyps in want
    ]
    assert max(len(hyps[0].tokens) for hyps in want) >= 3  # the steps after the first ran


def step_twice(flat: FlatDecoder, model: Transformer) -> None:
    """A first step and a second one, both through `flat`."""
    src = sources(rows=2)
    memory, cache = model.encode(src), model.new_cache()
    tokens = torch.full((2, 1), BOS)
    flat.decode(tokens, memory, cache)
    flat.decode(tokens, memory, cache)


def test_only_the_first_step_goes_through_the_model():
    model = model_of(False, packed=True)
    flat, spy = FlatDecoder(model), Spy(model)
    with torch.inference_mode():
        step_twice(flat, model)
    assert spy.calls == 1  # the first, which projects the cross-attention keys and values


def test_training_mode_autograd_and_autocast_go_through_the_model():
    model = model_of(False, packed=False)
    flat, spy = FlatDecoder(model), Spy(model)
    step_twice(flat, model)  # autograd on
    assert spy.calls == 2
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        step_twice(flat, model)
    assert spy.calls == 4
    model.train()
    with torch.inference_mode():
        step_twice(flat, model)
    assert spy.calls == 6


def test_several_tokens_at_once_go_through_the_model():
    model = model_of(False, packed=True)
    flat = FlatDecoder(model)
    src, tgt_in = sources(rows=2), torch.tensor([[BOS, 5, 6], [BOS, 7, 8]])
    with torch.inference_mode():
        memory = model.encode(src)
        got = flat.decode(tgt_in, memory, model.new_cache())
        want = model.decode(tgt_in, memory, model.new_cache())
    assert torch.equal(got, want)


def test_an_unknown_structure_or_seq2seq_flat_0_keeps_the_model(monkeypatch):
    class OtherLayer(DecoderLayer):
        pass

    model = model_of(False, packed=True)
    assert isinstance(flat_decoder(model), FlatDecoder)
    monkeypatch.setenv("SEQ2SEQ_FLAT", "0")
    assert flat_decoder(model) is model
    monkeypatch.delenv("SEQ2SEQ_FLAT")
    model.decoder_layers[1] = OtherLayer(dataclasses.replace(model.cfg))
    assert flat_decoder(model) is model
    model = model_of(False, packed=True)
    model.decoder_layers[0].ffn_res.norm = nn.RMSNorm(model.cfg.d_model)
    assert flat_decoder(model) is model


def test_a_translator_decodes_through_flat_decoders(checkpoint):
    single = Translator.load(checkpoint, device="cpu")
    assert isinstance(single.decoder, FlatDecoder)
    ensemble = Translator.load([checkpoint, checkpoint], device="cpu")
    assert all(isinstance(part, FlatDecoder) for part in ensemble.decoder.models)
    assert ensemble.translate(["A dog runs."]) == single.translate(["A dog runs."])


def test_a_whole_targets_states_or_autograd_project_through_the_model():
    model = model_of(False, packed=True)
    flat = FlatDecoder(model)
    states = torch.randn(2, 3, model.cfg.d_model, requires_grad=True)
    logits = flat.project(states)  # autograd on, (B, T, D): the model's own projection
    assert logits.shape == (2, 3, V) and logits.grad_fn is not None
    assert torch.equal(logits, model.project(states))
    with torch.inference_mode():
        assert torch.equal(flat.project(states[:, 0]), model.project(states[:, 0]))
