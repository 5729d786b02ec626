"""Cross-attention heatmaps for `seq2seq translate --attention DIR`.

The weights are recomputed after search, for the final hypothesis only, by one teacher-forced
forward pass with forward hooks on the decoder's cross-attention modules (search itself runs
`F.scaled_dot_product_attention`, which never materialises the weights, so normal decoding
pays nothing). The heatmap shows the weights averaged over all decoder layers and all heads:
one row per target position (the output pieces, then EOS), one column per source piece (EOS
included).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from seq2seq.inference.search import BOS, EOS
from seq2seq.nn.transformer import CrossAttention, Memory, Transformer, split_heads


def _weights(module: CrossAttention, x: Tensor, memory: Memory) -> Tensor:
    """softmax(Q K^T / sqrt(Dh)) of one cross-attention, averaged over heads: (B, T, S)."""
    q = split_heads(module.q(x), module.n_heads)  # (B, H, T, Dh)
    k = split_heads(module.kv(memory.states).chunk(2, dim=-1)[0], module.n_heads)  # (B, H, S, Dh)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.masked_fill(~memory.mask, -math.inf)
    return scores.float().softmax(dim=-1).mean(dim=1)


@torch.inference_mode()
def cross_attention(model: Transformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    """Cross-attention of a teacher-forced pass, averaged over layers and heads.

    Args:
        src: (B, S) source ids, right-padded.
        tgt_in: (B, T) BOS + target ids.

    Returns:
        (B, T, S) weights; row t is where position t looked while predicting token t + 1.
    """
    per_layer: list[Tensor] = []

    def hook(module: CrossAttention, args: tuple, output: Tensor) -> None:
        x, memory = args[0], args[1]
        per_layer.append(_weights(module, x, memory))

    handles = [layer.cross_attn.register_forward_hook(hook) for layer in model.decoder_layers]
    try:
        model(src, tgt_in)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(per_layer).mean(dim=0)


def plot_heatmap(weights: Tensor, src_pieces: list[str], tgt_pieces: list[str], path: Path):
    """Draw weights (T, S) with target pieces down and source pieces across into a PNG."""
    T, S = weights.shape
    fig = Figure(figsize=(max(4.0, 0.35 * S + 2), max(3.0, 0.35 * T + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(weights.numpy(), cmap="Greys", vmin=0.0, aspect="auto")
    ax.set_xticks(range(S), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(T), tgt_pieces, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_heatmap(
    model: Transformer, tokenizer, line: str, src_ids: list[int], tgt: list[int], path: Path
) -> Path:
    """Heatmap of one translation: `src_ids` (pieces + EOS) of `line`, output ids `tgt`."""
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], device=device)
    tgt_in = torch.tensor([[BOS, *tgt]], device=device)
    weights = cross_attention(model, src, tgt_in)[0].cpu()  # (T + 1, S)
    src_pieces = tokenizer.src_pieces(line)
    if len(src_pieces) != len(src_ids):  # the line was truncated
        src_pieces = src_pieces[: len(src_ids) - 1] + src_pieces[-1:]
    return plot_heatmap(weights, src_pieces, tokenizer.tgt_pieces([*tgt, EOS]), path)
