"""The model's decoding step as one function: the same operations on the same tensors as
`Transformer.decode`, without its module calls.

A search feeds the decoder one token per row and step. Through the model's modules that step
is about twenty `nn.Module` calls per layer (residual wrappers and their lambdas, eval-mode
dropouts, each linear layer's own checks), a few microseconds of Python each, on top of the
operations themselves. With few rows, as when a single sentence is translated or a batch
decodes its last, longest sentences, that Python is a large share of the step. On a 2-core
Intel Xeon (AMX) the default recipe's model translated sentences one at a time 1.20-1.26x
faster greedy through `FlatDecoder` than through its modules, and 1.23-1.28x beam 5 (one
thread, 60-100 sentences, alternating rounds in one process); its whole test set in the
default batches 1.05-1.09x greedy and 1.02-1.04x beam 5 (2 streams); identical output.

`FlatDecoder.decode` runs a step in one loop over the layers: each operation the modules would
run, in their order, on their parameters, so the states are bitwise the model's
(`tests/test_flat.py` compares them at every step through greedy search's reorders, post-norm
and pre-norm, float32 packed and plain, bf16 and int8, and beam search's hypotheses). Each linear layer is called as its module would compute
it: MKL's packed op directly for a `seq2seq.kernels.mkl.MklPackedLinear` (the checks its
forward makes per call hold for the whole decode: float32 weights on a CPU, outside autograd),
`F.linear` for a plain `nn.Linear`, the module itself for any other kind (oneDNN's, int8's).
Dropout is left out: the model is in eval mode, where it returns its input.

It decodes through the model itself where the step is not the plain one: several tokens at
once (scoring a given target), the first step (which projects the cross-attention keys and
values), a model in training mode, autograd or autocast on. `flat_decoder` gives the model
itself for a structure this module does not know (then nothing changes), or with
`SEQ2SEQ_FLAT=0`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.kernels.mkl import MklPackedLinear
from seq2seq.nn.cache import DecoderCache, LayerCache
from seq2seq.nn.transformer import (
    CrossAttention,
    DecoderLayer,
    Embedding,
    FeedForward,
    Memory,
    Residual,
    SelfAttention,
    Transformer,
)

Step = Callable[[Tensor], Tensor]


def flat_decoder(model: Transformer) -> Transformer | FlatDecoder:
    """A FlatDecoder of `model`, or `model` itself where its structure is not the one
    `FlatDecoder` follows (a subclassed layer, a norm that is not LayerNorm), or where
    `SEQ2SEQ_FLAT=0`."""
    if os.environ.get("SEQ2SEQ_FLAT", "1") == "0" or not _known(model):
        return model
    return FlatDecoder(model)


def _known(model: Transformer) -> bool:
    """Whether every module a decoding step runs is of the type FlatDecoder follows."""
    if type(model) is not Transformer or type(model.tgt_embed) is not Embedding:
        return False
    if type(model.decoder_norm) not in (nn.Identity, nn.LayerNorm):
        return False
    types = (SelfAttention, CrossAttention, FeedForward, Residual, Residual, Residual)
    for layer in model.decoder_layers:
        parts = (layer.self_attn, layer.cross_attn, layer.ffn)
        parts += (layer.self_attn_res, layer.cross_attn_res, layer.ffn_res)
        if type(layer) is not DecoderLayer or tuple(map(type, parts)) != types:
            return False
        if any(type(res.norm) is not nn.LayerNorm for res in parts[3:]):
            return False
    return True


def _linear(layer: nn.Module) -> Step:
    """x (N, in_features) -> what `layer(x)` computes."""
    if type(layer) is MklPackedLinear:
        return layer.packed_forward
    if type(layer) is nn.Linear:
        return functools.partial(F.linear, weight=layer.weight, bias=layer.bias)
    return layer


def _norm(norm: nn.LayerNorm) -> Step:
    return functools.partial(
        F.layer_norm,
        normalized_shape=norm.normalized_shape,
        weight=norm.weight,
        bias=norm.bias,
        eps=norm.eps,
    )


class _Layer:
    """One decoder layer's steps, taken from its modules once."""

    def __init__(self, layer: DecoderLayer):
        self.qkv, self.self_out = _linear(layer.self_attn.qkv), _linear(layer.self_attn.out)
        self.q, self.cross_out = _linear(layer.cross_attn.q), _linear(layer.cross_attn.out)
        self.w1, self.w2 = _linear(layer.ffn.w1), _linear(layer.ffn.w2)
        activation = layer.ffn.activation  # an Identity once a packed w1 took the ReLU in
        self.activation = None if type(activation) is nn.Identity else activation
        self.norms = tuple(
            _norm(res.norm) for res in (layer.self_attn_res, layer.cross_attn_res, layer.ffn_res)
        )


class FlatDecoder:
    """`model` as a search's Decoder (seq2seq.inference.search), its one-token steps run by
    `decode` without module calls. Built for a model in eval mode whose parameters no longer
    change place (the packed layers of `prepare_model` are read as they are now)."""

    def __init__(self, model: Transformer):
        self.model, self.cfg = model, model.cfg
        self.heads = model.cfg.n_heads
        self.pre_norm = model.cfg.pre_norm
        self.layers = [_Layer(layer) for layer in model.decoder_layers]
        final = model.decoder_norm
        self.final = None if type(final) is nn.Identity else _norm(final)
        self.generator = _linear(model.generator)
        # Each layer's sub-layers, in order, each with its Residual's LayerNorm (`_Layer.norms`).
        self.sublayers = (self._self_attention, self._cross_attention, self._feed_forward)

    @property
    def tgt_vocab_size(self) -> int:
        return self.model.tgt_vocab_size

    def encode(self, src: Tensor) -> Memory:
        return self.model.encode(src)

    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        return self.model.new_cache(capacity)

    def project(self, states: Tensor) -> Tensor:
        """Logits (R, V) of a step's states (R, D), as `model.project` gives them (which
        projects other states, such as a whole target's (B, T, D))."""
        if states.dim() == 2 and states.size(0) > 0 and self._plain(states):
            return self.generator(states)
        return self.model.project(states)

    def decode(self, tgt_in: Tensor, memory: Memory, cache: DecoderCache) -> Tensor:
        """States (R, 1, D) of the newest tokens tgt_in (R, 1), bitwise `model.decode`'s; other
        steps (see the module's docstring) go through the model."""
        if not self._flat(tgt_in, cache):
            return self.model.decode(tgt_in, memory, cache)
        R, D = tgt_in.size(0), self.cfg.d_model
        x = self.model.tgt_embed(tgt_in, cache.length).view(R, D)  # (R, D): one token per row
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            # Each sub-layer inside its Residual: post-norm, or pre-norm.
            for sublayer, norm in zip(self.sublayers, layer.norms, strict=True):
                if self.pre_norm:
                    x = x + sublayer(norm(x), layer, layer_cache, memory)
                else:
                    x = norm(x + sublayer(x, layer, layer_cache, memory))
        cache.length += 1
        if self.final is not None:
            x = self.final(x)
        return x.view(R, 1, D)

    def _self_attention(self, x: Tensor, layer: _Layer, cache: LayerCache, _: Memory) -> Tensor:
        """SelfAttention of one new position per row over the cached ones."""
        R, D = x.shape
        qkv = layer.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(R, 1, self.heads, -1).transpose(1, 2) for t in qkv)  # (R, H, 1, Dh)
        k, v = cache.append_self(k, v)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return layer.self_out(y.transpose(1, 2).reshape(R, D))

    def _cross_attention(
        self, x: Tensor, layer: _Layer, cache: LayerCache, memory: Memory
    ) -> Tensor:
        """CrossAttention over the cached keys and values, one row per sentence: a sentence's
        beams attend in one call."""
        R, D = x.shape
        H = self.heads
        q = layer.q(x).view(R, 1, H, -1).transpose(1, 2)  # (R, H, 1, Dh)
        k, v = cache.cross_k, cache.cross_v
        N, Dh = k.size(0), k.size(-1)
        group = R // N
        if group > 1:
            q = q.view(N, group, H, 1, Dh).transpose(1, 2).reshape(N, H, group, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory.mask, dropout_p=0.0)
        if group > 1:
            y = y.view(N, H, group, 1, Dh).transpose(1, 2).reshape(R, H, 1, Dh)
        return layer.cross_out(y.transpose(1, 2).reshape(R, D))

    @staticmethod
    def _feed_forward(x: Tensor, layer: _Layer, *_: object) -> Tensor:
        h = layer.w1(x)
        return layer.w2(h if layer.activation is None else layer.activation(h))

    def _flat(self, tgt_in: Tensor, cache: DecoderCache) -> bool:
        """Whether this step is one `decode` runs itself: one token per row, the cross-attention
        keys and values cached, and `_plain`."""
        return (
            tgt_in.size(1) == 1
            and tgt_in.size(0) > 0
            and cache.length > 0
            and cache.layers[0].cross_k is not None
            and self._plain(tgt_in)
        )

    def _plain(self, x: Tensor) -> bool:
        """Eval mode, no autograd, no autocast: what the flat steps assume."""
        return not (
            self.model.training
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled(x.device.type)
        )
