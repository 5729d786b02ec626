"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), in the paper's order.

Read next to the paper: 3.4 embeddings, 3.5 positional encoding, 3.2 attention, 3.3
feed-forward network, 3.1 encoder and decoder stacks. Deviations are options, off by default:
pre-norm (LayerNorm before each sub-layer, plus a final LayerNorm per stack), attention and
activation dropout, an output bias, untied embeddings.

Conventions: B batch, S source length, T target length, D d_model, H heads, Dh = D / H.
Masks are boolean with True = "may attend", as `F.scaled_dot_product_attention` takes them.
Padding is always on the right, so the causal mask alone keeps every real target position
from seeing padding (padding sits only after it).

The encoder runs its position-wise layers (projections, feed-forward, LayerNorm, dropout) on
the real source tokens only, packed into (N, D) (`seq2seq.layout.Packing`), and so do the
decoder's cross-attention key/value projections; only attention sees the padded (B, S)
layout. Source padding therefore costs no FLOPs outside attention; the result is the same. On
a CPU the real tokens are found from the ids; on an accelerator only a training batch's
host-made `src_positions` say where. A training batch may also put several sentences in each
row (`seq2seq.layout.Rows`): positions then restart per sentence and attention is masked per
sentence. The model calls its own `nn.Linear`, `nn.ReLU` and `nn.Dropout` modules; faster
kernels for them are swapped in from outside, at fit or load time (`seq2seq.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.layout import Packing, Rows
from seq2seq.nn.cache import DecoderCache, LayerCache


# --- 3.5 Positional encoding ----------------------------------------------------------------
def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same).

    Layout: interleaved, exactly as the paper writes it (even dimensions sine, odd cosine);
    fairseq and tensor2tensor concatenate the sine half and the cosine half instead.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (D/2,)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (P, D/2)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)[:, : d_model // 2]
    return table.float()


class Embedding(nn.Module):
    """3.4 + 3.5: token embedding * sqrt(d_model) + positional encoding, then dropout."""

    def __init__(self, tokens: nn.Embedding, cfg: ModelConfig):
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.d_model)
        self.register_buffer(
            "positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """ids (B, L) -> (B, L, D); `offset` is the position of ids[:, 0] (incremental decoding),
        or `positions` (B, L) give each token's position in its sentence (`Rows`)."""
        if positions is not None:  # sentence lengths were checked on the host, before training
            pe = self.positions[positions]  # (B, L, D)
        else:
            L = ids.size(1)
            if offset + L > self.positions.size(0):
                raise ValueError(
                    f"sequence of {offset + L} positions exceeds model.max_positions={self.positions.size(0)}"
                )
            pe = self.positions[offset : offset + L]  # (L, D)
        return self.dropout(self.tokens(ids) * self.scale + pe.to(self.tokens.weight.dtype))


# --- 3.2 Attention ----------------------------------------------------------------------------
def split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, L, D = x.shape
    return x.view(B, L, n_heads, D // n_heads).transpose(1, 2)  # (B, H, L, Dh)


def merge_heads(x: Tensor) -> Tensor:
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)  # (B, L, D)


def _xavier_per_projection(linear: nn.Linear, n_parts: int) -> None:
    """Xavier-uniform init of each d_model x d_model block of a fused projection, zero bias."""
    for w in linear.weight.chunk(n_parts, dim=0):
        nn.init.xavier_uniform_(w)
    nn.init.zeros_(linear.bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused Q/K/V projection (3.2.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.attention_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        _xavier_per_projection(self.qkv, 3)
        _xavier_per_projection(self.out, 1)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        causal: bool,
        cache: LayerCache | None = None,
        packing: Packing | None = None,
    ) -> Tensor:
        """x (B, L, D), or (N, D) real tokens with their `packing`; mask (B, 1, 1, L)
        key-padding mask or None; causal for the decoder."""
        qkv = self.qkv(x)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (B, L, 3D), zeros at padding (masked keys)
        q, k, v = (split_heads(t, self.n_heads) for t in qkv.chunk(3, dim=-1))
        # A Python bool, never a shape comparison: under torch.compile with dynamic shapes
        # that would be a symbolic bool, which SDPA's is_causal refuses (a graph break).
        fresh = cache is None or cache.self_k is None  # no earlier positions to attend to
        if cache is not None:
            past = cache.self_length
            k, v = cache.append_self(k, v)  # (B, H, past + L, Dh)
            if causal and not fresh and q.size(2) > 1:
                # New queries see all cached positions and the causal part of the new ones.
                L, total = q.size(2), k.size(2)
                mask = torch.ones(L, total, dtype=torch.bool, device=x.device).tril(past)
        is_causal = causal and fresh
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = merge_heads(y)
        return self.out(y if packing is None else packing.pack(y))


class CrossAttention(nn.Module):
    """Encoder-decoder attention (3.2.3): queries from the decoder, keys/values from memory."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.attention_dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        for proj, parts in ((self.q, 1), (self.kv, 2), (self.out, 1)):
            _xavier_per_projection(proj, parts)

    def forward(self, x: Tensor, memory: Memory, cache: LayerCache | None = None) -> Tensor:
        """x (R, T, D) attends over memory.states (N, S, D); K/V are projected once per sentence.

        R = N * k: with beam search each sentence's k beams (rows sentence-major) share the
        sentence's keys/values, and their queries attend in one call.
        """
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            if memory.packing is not None:  # project real source tokens only (zeros: masked)
                kv = memory.packing.unpack(self.kv(memory.packed))
            else:
                kv = self.kv(memory.states)
            k, v = (split_heads(t, self.n_heads) for t in kv.chunk(2, dim=-1))
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        q = split_heads(self.q(x), self.n_heads)  # (R, H, T, Dh)
        R, H, T, Dh = q.shape
        N = k.size(0)
        group = R // N
        if group > 1:  # (N * k, H, T, Dh) -> (N, H, k * T, Dh)
            q = q.view(N, group, H, T, Dh).transpose(1, 2).reshape(N, H, group * T, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=memory.mask, dropout_p=self.dropout if self.training else 0.0
        )
        if group > 1:
            y = y.view(N, H, group, T, Dh).transpose(1, 2).reshape(R, H, T, Dh)
        return self.out(merge_heads(y))


# --- 3.3 Position-wise feed-forward network --------------------------------------------------
class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.activation = nn.ReLU()  # registered right after w1: kernels fuse the pair
        self.dropout = nn.Dropout(cfg.activation_dropout)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model)
        for w in (self.w1, self.w2):
            _xavier_per_projection(w, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


# --- 3.1 Residual connection + layer normalisation -------------------------------------------
class Residual(nn.Module):
    """Post-norm (paper): LayerNorm(x + Dropout(f(x))). Pre-norm option: x + Dropout(f(LayerNorm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre_norm = cfg.pre_norm

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.self_attn_res = SelfAttention(cfg), Residual(cfg)
        self.ffn, self.ffn_res = FeedForward(cfg), Residual(cfg)

    def forward(self, x: Tensor, src_mask: Tensor, packing: Packing | None = None) -> Tensor:
        """x (B, S, D), or (N, D) real tokens with their `packing`."""
        x = self.self_attn_res(
            x, lambda h: self.self_attn(h, src_mask, causal=False, packing=packing)
        )
        return self.ffn_res(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.self_attn_res = SelfAttention(cfg), Residual(cfg)
        self.cross_attn, self.cross_attn_res = CrossAttention(cfg), Residual(cfg)
        self.ffn, self.ffn_res = FeedForward(cfg), Residual(cfg)

    def forward(
        self, x: Tensor, memory: Memory, cache: LayerCache | None, self_mask: Tensor | None = None
    ) -> Tensor:
        """`self_mask` (B, 1, T, T) replaces the causal mask (`Rows`: causal within sentences)."""
        causal = self_mask is None
        x = self.self_attn_res(x, lambda h: self.self_attn(h, self_mask, causal, cache=cache))
        x = self.cross_attn_res(x, lambda h: self.cross_attn(h, memory, cache))
        return self.ffn_res(x, self.ffn)


@dataclass
class Memory:
    """The encoder's output: states (B, S, D) and key mask (B, 1, 1, S), True at real tokens
    (with `Rows`, (B, 1, T, S): each target token sees its own sentence's source).

    Where the encoder skipped padding, also the real tokens' states `packed` (N, D) and their
    `packing`, so that each decoder layer projects its cross-attention keys and values from
    real tokens only.
    """

    states: Tensor
    mask: Tensor
    packed: Tensor | None = None
    packing: Packing | None = None

    def select(self, index: Tensor) -> Memory:
        """Rows `index` (beam search: repeat per beam; drop finished sentences)."""
        return Memory(self.states.index_select(0, index), self.mask.index_select(0, index))


# --- The encoder-decoder ----------------------------------------------------------------------
class Transformer(nn.Module):
    """Encoder-decoder Transformer. `forward` gives decoder states; `project` gives logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.src_vocab_size <= 0 or cfg.tgt_vocab_size <= 0:
            raise ValueError("model.src_vocab_size and model.tgt_vocab_size must be set (> 0)")
        self.cfg = cfg
        src_tokens = self._token_embedding(cfg.src_vocab_size, cfg)
        tgt_tokens = (
            src_tokens if cfg.joint_vocab else self._token_embedding(cfg.tgt_vocab_size, cfg)
        )
        self.src_embed = Embedding(src_tokens, cfg)
        self.tgt_embed = self.src_embed if cfg.joint_vocab else Embedding(tgt_tokens, cfg)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm leaves the last sub-layer's output un-normalised: add a final LayerNorm.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        # 3.4: the pre-softmax linear transformation, sharing the target embedding's weight.
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        if cfg.joint_vocab or cfg.tie_output:
            self.generator.weight = tgt_tokens.weight
        else:
            nn.init.normal_(self.generator.weight, std=cfg.d_model**-0.5)
        if self.generator.bias is not None:
            nn.init.zeros_(self.generator.bias)
        self._register_load_state_dict_pre_hook(self._older_names)

    def _older_names(self, state_dict: dict, prefix: str, *_: object) -> None:
        """Checkpoints written before the projection was the `generator` module stored its
        untied weight and bias as `output_weight`/`output_bias`, and a tied one not at all."""
        for old, new in (("output_weight", "generator.weight"), ("output_bias", "generator.bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if prefix + "generator.weight" not in state_dict:
            state_dict[prefix + "generator.weight"] = state_dict[prefix + "tgt_embed.tokens.weight"]

    @staticmethod
    def _token_embedding(vocab_size: int, cfg: ModelConfig) -> nn.Embedding:
        emb = nn.Embedding(vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(emb.weight, std=cfg.d_model**-0.5)  # unit variance after * sqrt(d_model)
        with torch.no_grad():
            emb.weight[cfg.pad_id].zero_()
        return emb

    def encode(
        self, src: Tensor, src_positions: Tensor | None = None, rows: Rows | None = None
    ) -> Memory:
        """src (B, S) ids, right-padded -> Memory with states (B, S, D). `src_positions` (N,)
        are the flat positions of src's real tokens, as a collated batch carries them: with
        them the layers skip padding on every device, without them on a CPU only. With `rows`,
        each row of src holds several sentences."""
        real = src != self.cfg.pad_id  # (B, S)
        key_mask = real[:, None, None, :]  # (B, 1, 1, S)
        self_mask, memory_mask = (
            (key_mask, key_mask) if rows is None else (rows.src_mask(), rows.cross_mask())
        )
        packing = Packing.of(real, src_positions)
        x = self.src_embed(src, positions=None if rows is None else rows.src_position)
        if packing is not None:
            x = packing.pack(x)  # (N, D): the layers below skip padding
        for layer in self.encoder_layers:
            x = layer(x, self_mask, packing)
        x = self.encoder_norm(x)
        if packing is None:
            return Memory(x, memory_mask)
        return Memory(packing.unpack(x), memory_mask, packed=x, packing=packing)

    def decode(
        self,
        tgt_in: Tensor,
        memory: Memory,
        cache: DecoderCache | None = None,
        rows: Rows | None = None,
    ) -> Tensor:
        """tgt_in (B, T) ids (BOS + target, or the newest tokens when cached) -> states (B, T, D).
        With `rows` (training), each row holds several sentences: positions restart and the
        causal mask stops at each sentence."""
        offset = 0 if cache is None else cache.length
        if rows is None:
            x, self_mask = self.tgt_embed(tgt_in, offset), None
        else:
            x, self_mask = self.tgt_embed(tgt_in, positions=rows.tgt_position), rows.tgt_mask()
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, None if cache is None else cache.layers[i], self_mask)
        if cache is not None:
            cache.length += tgt_in.size(1)
        return self.decoder_norm(x)

    def forward(
        self,
        src: Tensor,
        tgt_in: Tensor,
        src_positions: Tensor | None = None,
        rows: Rows | None = None,
    ) -> Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> decoder states (B, T, D)."""
        return self.decode(tgt_in, self.encode(src, src_positions, rows), rows=rows)

    def project(self, states: Tensor) -> Tensor:
        """Pre-softmax linear (3.4): states (..., D) -> logits (..., V_tgt)."""
        return self.generator(states)

    def output_projection(self) -> tuple[Tensor, Tensor | None]:
        """The pre-softmax linear's weight (V_tgt, D), tied to the target embedding by
        default, and its bias (None: the paper has none): the loss fuses this matmul."""
        return self.generator.weight, self.generator.bias

    @property
    def tgt_vocab_size(self) -> int:
        return self.cfg.tgt_vocab_size

    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        """An empty cache; `capacity`: how many positions decoding will feed, if known."""
        return DecoderCache.empty(len(self.decoder_layers), capacity)

    def decode_step(self, tgt_in: Tensor, memory: Memory, cache: DecoderCache) -> Tensor:
        """Incremental decoding: the newest tokens tgt_in (B, L) -> logits (B, L, V_tgt).
        (Search calls `decode` and `project` itself, to project a step's rows in pieces.)"""
        return self.project(self.decode(tgt_in, memory, cache))
