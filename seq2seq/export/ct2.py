"""Our Transformer as a CTranslate2 model, through CTranslate2's own converter API.

Why not `TransformersConverter` on the Hugging Face export: its Marian loader makes the decoder
start from a zero vector (Marian C++'s convention) and drops the last vocabulary row, and our
decoder starts from BOS's learned embedding. So we fill a `TransformerSpec` (the spec that
CTranslate2's OpenNMT and fairseq converters fill too) from our modules directly, in our own
d_model basis: our interleaved position table is stored as the spec's position encodings, so
no permutation is needed. Pre-norm models map too (the spec has pre-norm layers and final
LayerNorms). CTranslate2 then validates, optionally quantizes (`quantization='int8'`, ...)
and saves it.

Decoding with the result: source tokens are our pieces, and the config appends </s> itself
(`add_source_eos`); decoding starts from <s>. Pass `suppress_sequences=[['<pad>'], ['<s>']]`
to forbid what our search never emits (`SUPPRESS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seq2seq.inference.checkpoint import LoadedModel
from seq2seq.nn.transformer import Transformer, sinusoidal_positions

#: What our search never emits, as CTranslate2's suppress_sequences.
SUPPRESS = [["<pad>"], ["<s>"]]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = _np(weight)
    if bias is not None:
        spec.bias = _np(bias)


def _norm(spec, ln: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _np(ln.weight), _np(ln.bias)


def _ffn(spec, layer) -> None:
    _linear(spec.linear_0, layer.ffn.w1.weight, layer.ffn.w1.bias)
    _linear(spec.linear_1, layer.ffn.w2.weight, layer.ffn.w2.bias)
    _norm(spec.layer_norm, layer.ffn_res.norm)


def _self_attention(spec, attn, norm) -> None:
    _linear(spec.linear[0], attn.qkv.weight, attn.qkv.bias)  # fused Q/K/V, as CTranslate2's
    _linear(spec.linear[-1], attn.out.weight, attn.out.bias)
    _norm(spec.layer_norm, norm)


def _inputs(spec, embed, positions: np.ndarray) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _np(embed.tokens.weight)
    spec.scale_embeddings = True  # * sqrt(d_model), as ours
    spec.position_encodings.encodings = positions


def model_spec(model: Transformer, tokenizer):
    """A filled `ctranslate2.specs.TransformerSpec` for our model and its vocabularies."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers),
        cfg.n_heads,
        pre_norm=cfg.pre_norm,
        activation=common_spec.Activation.RELU,
    )
    positions = _np(sinusoidal_positions(cfg.max_positions, cfg.d_model))
    with torch.no_grad():
        _inputs(spec.encoder, model.src_embed, positions)
        _inputs(spec.decoder, model.tgt_embed, positions)
        for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers, strict=True):
            _self_attention(layer_spec.self_attention, layer.self_attn, layer.self_attn_res.norm)
            _ffn(layer_spec.ffn, layer)
        for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers, strict=True):
            _self_attention(layer_spec.self_attention, layer.self_attn, layer.self_attn_res.norm)
            ca = layer.cross_attn
            _linear(layer_spec.attention.linear[0], ca.q.weight, ca.q.bias)
            _linear(layer_spec.attention.linear[1], ca.kv.weight, ca.kv.bias)
            _linear(layer_spec.attention.linear[-1], ca.out.weight, ca.out.bias)
            _norm(layer_spec.attention.layer_norm, layer.cross_attn_res.norm)
            _ffn(layer_spec.ffn, layer)
        if cfg.pre_norm:
            _norm(spec.encoder.layer_norm, model.encoder_norm)
            _norm(spec.decoder.layer_norm, model.decoder_norm)
        _linear(spec.decoder.projection, model.generator.weight, model.generator.bias)
    spec.config.layer_norm_epsilon = 1e-5  # torch's default, ours; CTranslate2's is 1e-6
    spec.config.add_source_eos = True
    spec.config.decoder_start_token = "<s>"
    src, tgt = tokenizer_pieces(tokenizer)
    spec.register_source_vocabulary(src)
    spec.register_target_vocabulary(tgt)
    return spec


def tokenizer_pieces(tokenizer) -> tuple[list[str], list[str]]:
    """Source and target pieces in id order (id i is piece i)."""
    import sentencepiece as spm

    state = tokenizer.to_state()
    protos = [state["src_model"], state["src_model"] if state["joint"] else state["tgt_model"]]
    out = []
    for proto in protos:
        sp = spm.SentencePieceProcessor(model_proto=proto)
        out.append([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    return out[0], out[1]


def write_ct2(loaded: LoadedModel, out: Path, quantization: str | None) -> None:
    """Convert `loaded` with CTranslate2's converter into the new folder `out`, with our
    SentencePiece models beside it (source.spm, target.spm) for tokenizing."""
    from ctranslate2.converters.converter import Converter

    spec = model_spec(loaded.model.float(), loaded.tokenizer)

    class _Ours(Converter):
        def _load(self):
            return spec

    try:
        _Ours().convert(str(out), quantization=quantization)
    except ValueError as err:  # e.g. an unknown quantization type
        raise ValueError(f"--quantization {quantization}: {err}") from None
    state = loaded.tokenizer.to_state()
    (out / "source.spm").write_bytes(state["src_model"])
    (out / "target.spm").write_bytes(state["src_model"] if state["joint"] else state["tgt_model"])
