"""Label-smoothed cross-entropy (Szegedy et al., 2016; "Attention Is All You Need" 5.4).

Convention: the smoothed target puts 1 - epsilon on the reference token and spreads epsilon
uniformly over ALL V classes (the reference included), q = (1 - eps) * onehot + eps / V.
This is `torch.nn.functional.cross_entropy(label_smoothing=eps)`'s convention; fairseq
spreads eps over the V - 1 other classes instead, a difference of eps / V on the reference.

    loss = (1 - eps) * NLL + eps * mean_v(-log p_v)

Both terms come from one logsumexp over the vocabulary (no (N, V) log-prob tensor is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.model import Transformer


@dataclass
class LossOutput:
    """Means over the real (non-padding) target tokens, and how many there were."""

    loss: Tensor
    nll: Tensor
    n_tokens: int


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int | None = None
) -> LossOutput:
    """logits (..., V), target (...) -> smoothed loss and plain NLL, averaged over kept tokens.

    Positions whose target is `ignore_index` contribute nothing (not even to the mean).
    """
    logits, target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        logits, target = logits[keep], target[keep]
    logits = logits.float()  # the loss is always computed in float32, whatever the precision
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    nll = lse - logits.gather(-1, target[:, None]).squeeze(-1)  # -log p(reference)
    smooth = lse - logits.mean(dim=-1)  # mean over v of -log p(v)
    n = target.numel()
    denom = max(n, 1)
    loss = ((1.0 - epsilon) * nll + epsilon * smooth).sum() / denom
    return LossOutput(loss=loss, nll=nll.sum() / denom, n_tokens=n)


def translation_loss(
    model: Transformer, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, epsilon: float
) -> LossOutput:
    """Teacher-forced loss of a batch. The output projection runs only on real target
    positions: padding costs no vocabulary-sized FLOPs.

    src (B, S), tgt_in (B, T) = BOS + target, tgt_out (B, T) = target + EOS, right-padded.
    """
    states = model(src, tgt_in)  # (B, T, D)
    keep = tgt_out != model.cfg.pad_id  # (B, T)
    logits = model.project(states[keep])  # (N, V)
    return label_smoothed_cross_entropy(logits, tgt_out[keep], epsilon)
