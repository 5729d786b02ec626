"""Label-smoothed cross-entropy (Szegedy et al., 2016; "Attention Is All You Need" 5.4).

Convention: the smoothed target puts 1 - epsilon on the reference token and spreads epsilon
uniformly over ALL V classes (the reference included), q = (1 - eps) * onehot + eps / V.
This is `torch.nn.functional.cross_entropy(label_smoothing=eps)`'s convention; fairseq
spreads eps over the V - 1 other classes instead, a difference of eps / V on the reference.

    loss = (1 - eps) * NLL + eps * mean_v(-log p_v)

Both terms come from one fused log_softmax over the vocabulary, and the backward pass writes the
closed-form gradient (softmax - q) * g into one (N, V) buffer: a few sweeps over the
vocabulary instead of the dozen that autograd's composition of logsumexp/gather/mean takes.
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
    n = target.numel()
    denom = max(n, 1)
    per_token, nll = _SmoothedCrossEntropy.apply(logits, target, epsilon)
    return LossOutput(loss=per_token.sum() / denom, nll=nll.sum() / denom, n_tokens=n)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Per-token smoothed loss and NLL of logits (N, V), computed in float32.

    d loss_i / d logits_iv = softmax(logits_i)_v - q_iv, with q = (1 - eps) onehot + eps / V.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        ctx.in_dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss is computed in float32 (or float64), never lower
        log_probs = torch.log_softmax(logits, dim=-1)  # (N, V), one fused kernel
        nll = -log_probs.gather(-1, target[:, None]).squeeze(-1)  # -log p(reference)
        smooth = -log_probs.mean(dim=-1)  # mean over v of -log p(v)
        ctx.save_for_backward(log_probs, target)
        ctx.epsilon = epsilon
        ctx.mark_non_differentiable(nll)
        return (1.0 - epsilon) * nll + epsilon * smooth, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor) -> tuple[Tensor, None, None]:
        log_probs, target = ctx.saved_tensors
        eps, V = ctx.epsilon, log_probs.size(-1)
        grad = log_probs.exp()  # softmax, (N, V)
        grad.sub_(eps / V)
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, target] -= 1.0 - eps
        grad.mul_(grad_loss[:, None])
        return grad.to(ctx.in_dtype), None, None


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
