"""Our Transformer as a Hugging Face `MarianMTModel` folder, the same function exactly.

The mapping:
- Fused projections split: `qkv` into q_proj/k_proj/v_proj, cross-attention `kv` into
  k_proj/v_proj. ReLU, `scale_embedding` (both multiply by sqrt(d_model)), post-norm,
  LayerNorm eps 1e-5 on both sides.
- `decoder_start_token_id` is our BOS id; our output bias, if any, is `final_logits_bias`.
- Positions. Both tables hold sin(pos / 10000^(2i/D)) and cos of the same angle, positions
  from 0, but Marian puts the D/2 sines first and the cosines after them, where ours
  interleaves them (even dimensions sine). So we rename the d_model coordinates: Marian's
  coordinate h is our coordinate PERM[h], PERM = (0, 2, 4, ..., 1, 3, 5, ...). Applied to
  every tensor that touches the residual stream (embeddings and the output projection along
  D, every projection's input columns, the residual-writing projections' rows and biases,
  LayerNorm weights and biases), it changes no output: LayerNorm, attention and the FFN are
  equivariant under a permutation of the basis. Marian then adds its own table, which equals
  ours permuted (tested), so it is not stored (Marian rebuilds it on load).
- Tokenizer: source.spm/target.spm are our SentencePiece models, vocab.json maps each piece
  to its id (so ids are ours), MarianTokenizer appends </s> and no <s>, as we do.

What Marian cannot represent is refused with one line naming it: pre-norm layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.inference.checkpoint import LoadedModel
from seq2seq.nn.transformer import Transformer


def check_marian(cfg: ModelConfig) -> None:
    """Refuse what MarianMTModel has no layer for (one line, naming the feature)."""
    if cfg.pre_norm:
        raise ValueError(
            "model.pre_norm=true: Hugging Face Marian has post-norm layers only, so this model "
            "cannot be exported --to hf (--to ctranslate2 supports pre-norm)"
        )


def basis_permutation(d_model: int) -> Tensor:
    """PERM with Marian coordinate h = our coordinate PERM[h]: sines first, then cosines."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_config(cfg: ModelConfig) -> dict:
    """MarianConfig's arguments for our model shape."""
    joint = cfg.joint_vocab
    return {
        "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab_size,
        "share_encoder_decoder_embeddings": joint,
        "tie_word_embeddings": joint or cfg.tie_output,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "activation_function": "relu",
        "scale_embedding": True,
        "max_position_embeddings": cfg.max_positions,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "decoder_start_token_id": BOS_ID,
        "architectures": ["MarianMTModel"],
    }


def generation_config(decode: DecodeConfig, cfg: ModelConfig) -> dict:
    """Our saved decoding defaults in GenerationConfig's terms.

    Differences that cannot be mapped: Marian's length penalty divides by |y|^alpha where ours
    divides by ((5 + |y|) / 6)^alpha (the same ranking only at alpha 0), and its length limit is
    one number where ours is a * |x| + b per sentence: max_length is the model's position limit
    (plus the decoder start token), and a and b are kept as `seq2seq_max_len_a/b` for reference.
    """
    beam = decode.beam > 1
    return {
        "num_beams": decode.beam,
        "num_return_sequences": decode.nbest,
        # Beam settings: GenerationConfig refuses to save either beside greedy search.
        "length_penalty": decode.lenpen if beam else 1.0,
        "early_stopping": decode.stop == "beam" and beam,
        "max_length": cfg.max_positions + 1,
        "min_length": decode.min_len + 1,  # HF counts the decoder start token
        "bad_words_ids": [[PAD_ID], [BOS_ID]],  # we never emit pad or bos
        "decoder_start_token_id": BOS_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "forced_eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "seq2seq_max_len_a": decode.max_len_a,
        "seq2seq_max_len_b": decode.max_len_b,
    }


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under MarianMTModel's names, in Marian's d_model basis (see the module)."""
    cfg = model.cfg
    p = basis_permutation(cfg.d_model)

    def cols(w: Tensor) -> Tensor:  # a tensor whose last dim is d_model
        return w[..., p].contiguous()

    def rows(w: Tensor) -> Tensor:  # a tensor whose first dim is d_model (outputs, biases)
        return w[p].contiguous()

    out: dict[str, Tensor] = {}

    def linear_in(name: str, weight: Tensor, bias: Tensor) -> None:  # reads the stream
        out[f"{name}.weight"], out[f"{name}.bias"] = cols(weight), bias.clone()

    def linear_out(name: str, linear: torch.nn.Linear) -> None:  # writes the stream
        out[f"{name}.weight"], out[f"{name}.bias"] = rows(linear.weight), rows(linear.bias)

    def norm(name: str, ln: torch.nn.LayerNorm) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = rows(ln.weight), rows(ln.bias)

    def attention(name: str, w: Tensor, b: Tensor, names: tuple[str, ...], o) -> None:
        for part, pw, pb in zip(names, w.chunk(len(names)), b.chunk(len(names)), strict=True):
            linear_in(f"{name}.{part}_proj", pw, pb)
        linear_out(f"{name}.out_proj", o)

    def ffn(name: str, layer) -> None:
        linear_in(f"{name}.fc1", layer.ffn.w1.weight, layer.ffn.w1.bias)
        linear_out(f"{name}.fc2", layer.ffn.w2)
        norm(f"{name}.final_layer_norm", layer.ffn_res.norm)

    with torch.no_grad():
        src = cols(model.src_embed.tokens.weight)
        tgt = cols(model.tgt_embed.tokens.weight)
        out["model.encoder.embed_tokens.weight"] = src
        out["model.decoder.embed_tokens.weight"] = tgt
        if cfg.joint_vocab:
            out["model.shared.weight"] = src
        out["lm_head.weight"] = cols(model.generator.weight)
        bias = model.generator.bias
        out["final_logits_bias"] = (
            torch.zeros(1, cfg.tgt_vocab_size) if bias is None else bias.detach().clone()[None]
        )
        for i, layer in enumerate(model.encoder_layers):
            name = f"model.encoder.layers.{i}"
            sa = layer.self_attn
            attention(f"{name}.self_attn", sa.qkv.weight, sa.qkv.bias, ("q", "k", "v"), sa.out)
            norm(f"{name}.self_attn_layer_norm", layer.self_attn_res.norm)
            ffn(name, layer)
        for i, layer in enumerate(model.decoder_layers):
            name = f"model.decoder.layers.{i}"
            sa, ca = layer.self_attn, layer.cross_attn
            attention(f"{name}.self_attn", sa.qkv.weight, sa.qkv.bias, ("q", "k", "v"), sa.out)
            norm(f"{name}.self_attn_layer_norm", layer.self_attn_res.norm)
            linear_in(f"{name}.encoder_attn.q_proj", ca.q.weight, ca.q.bias)
            for part, w, b in zip(
                ("k", "v"), ca.kv.weight.chunk(2), ca.kv.bias.chunk(2), strict=True
            ):
                linear_in(f"{name}.encoder_attn.{part}_proj", w, b)
            linear_out(f"{name}.encoder_attn.out_proj", ca.out)
            norm(f"{name}.encoder_attn_layer_norm", layer.cross_attn_res.norm)
            ffn(name, layer)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def build_marian(model: Transformer, decode: DecodeConfig):
    """A `MarianMTModel` holding our weights (float32, eval mode)."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    check_marian(model.cfg)
    hf = MarianMTModel(MarianConfig(**marian_config(model.cfg))).eval()
    weights = marian_state_dict(model)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    positions = {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    if unexpected or set(missing) - positions:
        raise RuntimeError(f"Marian mapping mismatch: missing {missing}, unexpected {unexpected}")
    hf.generation_config = GenerationConfig(**generation_config(decode, model.cfg))
    return hf


def write_tokenizer(tokenizer, out: Path, max_positions: int) -> None:
    """source.spm, target.spm and vocab.json (+ target_vocab.json when the sides differ),
    then MarianTokenizer's own config files: `truncation=True` keeps `max_positions` ids
    (pieces, then EOS), as translate truncates, and '</s>' typed in a line is text to
    SentencePiece, as ours reads it, not an EOS (`split_special_tokens`)."""
    from transformers import MarianTokenizer

    state = tokenizer.to_state()
    src_proto = state["src_model"]
    tgt_proto = src_proto if state["joint"] else state["tgt_model"]
    (out / "source.spm").write_bytes(src_proto)
    (out / "target.spm").write_bytes(tgt_proto)
    separate = not state["joint"]
    for name, proto in (("vocab.json", src_proto), ("target_vocab.json", tgt_proto)):
        if name == "target_vocab.json" and not separate:
            continue
        (out / name).write_text(json.dumps(_vocab(proto), ensure_ascii=False, indent=1))
    hf_tok = MarianTokenizer(
        source_spm=str(out / "source.spm"),
        target_spm=str(out / "target.spm"),
        vocab=str(out / "vocab.json"),
        target_vocab_file=str(out / "target_vocab.json") if separate else None,
        separate_vocabs=separate,
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",  # only so that decoding skips the decoder start token
        model_max_length=max_positions,
        split_special_tokens=True,
    )
    _check_special_ids(hf_tok)
    hf_tok.save_pretrained(str(out))


def _vocab(proto: bytes) -> dict[str, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def _check_special_ids(tok) -> None:
    ids = (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id)
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise RuntimeError(f"MarianTokenizer special ids {ids} differ from ours")


def write_hf(loaded: LoadedModel, out: Path) -> None:
    """Write a MarianMTModel folder for `loaded` into the new folder `out`."""
    from transformers.utils import logging as hf_logging

    check_marian(loaded.model.cfg)
    hf_logging.disable_progress_bar()  # stderr keeps to one line per problem
    out.mkdir(parents=True)
    hf = build_marian(loaded.model.float(), loaded.decode)
    hf.save_pretrained(str(out))
    write_tokenizer(loaded.tokenizer, out, loaded.model.cfg.max_positions)
