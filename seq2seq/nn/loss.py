"""Label-smoothed cross-entropy (Szegedy et al., 2016; "Attention Is All You Need" 5.4).

Convention: the smoothed target puts 1 - epsilon on the reference token and spreads epsilon
uniformly over ALL V classes (the reference included), q = (1 - eps) * onehot + eps / V.
This is `torch.nn.functional.cross_entropy(label_smoothing=eps)`'s convention; fairseq
spreads eps over the V - 1 other classes instead, a difference of eps / V on the reference.

    loss = (1 - eps) * NLL + eps * mean_v(-log p_v)

Both terms come from one fused log_softmax over the vocabulary, and the backward pass writes the
closed-form gradient (softmax - q) * g into one (N, V) buffer: a few sweeps over the
vocabulary instead of the dozen that autograd's composition of logsumexp/gather/mean takes.

Training goes one step further (`projected_cross_entropy`): the output projection and the loss
run together over chunks of target positions, and each chunk's gradients with respect to the
decoder states and the output weight are formed right away, while its logits are still in
cache. No (N, V) tensor ever exists: the vocabulary-sized sweeps run on cache-sized chunks, and
the memory they took (logits, log-probabilities and their gradient, V floats per target token)
is gone. The matmuls are the same three as autograd's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seq2seq.layout import Rows
from seq2seq.nn.transformer import Transformer


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
        grad = _minus_smoothed_target_(log_probs.exp(), target, ctx.epsilon)  # (N, V)
        grad.mul_(grad_loss[:, None])
        return grad.to(ctx.in_dtype), None, None


def _minus_smoothed_target_(probs: Tensor, target: Tensor, epsilon: float) -> Tensor:
    """d loss / d logits = softmax - q, written over the softmax `probs` (N, V) in place."""
    grad = probs.sub_(epsilon / probs.size(-1))
    grad[torch.arange(grad.size(0), device=grad.device), target] -= 1.0 - epsilon
    return grad


#: x (M, K), weight (N, K), bias (N,) or None -> x @ weight.T + bias (M, N), without autograd.
MatmulT = Callable[[Tensor, Tensor, Tensor | None], Tensor]
#: Logits per chunk of `projected_cross_entropy`: about 8 MB of float32 on a CPU (cache-sized),
#: 512 MB on an accelerator (few launches, bounded memory).
CHUNK_ELEMENTS = {"cpu": 2**21}
DEFAULT_CHUNK_ELEMENTS = 2**27


def plain_matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight.T + bias -> (M, N): torch's own kernel."""
    return torch.nn.functional.linear(x, weight, bias)


def projected_cross_entropy(
    states: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    epsilon: float,
    matmul_t: MatmulT = plain_matmul_t,
) -> LossOutput:
    """The smoothed loss of softmax(states @ weight.T + bias) against `target`, chunk by chunk.

    states (N, D) are real target positions only (no padding), weight (V, D). Equal to
    `label_smoothed_cross_entropy(F.linear(states, weight, bias), target, epsilon)`, gradients
    included, without materialising the (N, V) logits. `matmul_t(x, w, b)` computes each
    chunk's x @ w.T + b without autograd (a faster kernel may be given: see `translation_loss`).
    """
    n = target.numel()
    rows = max(1, CHUNK_ELEMENTS.get(states.device.type, DEFAULT_CHUNK_ELEMENTS) // weight.size(0))
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (states, weight, bias)
    )
    loss, nll = _ProjectedSmoothedCrossEntropy.apply(
        states, weight, bias, target, epsilon, rows, grads, matmul_t
    )
    denom = max(n, 1)
    return LossOutput(loss=loss / denom, nll=nll / denom, n_tokens=n)


class _ProjectedSmoothedCrossEntropy(torch.autograd.Function):
    """Summed smoothed loss and NLL of F.linear(states, weight, bias); the gradients (for a
    unit upstream gradient) are built in the forward pass, one chunk of `rows` positions at a
    time, and only scaled in the backward pass."""

    @staticmethod
    def forward(
        ctx, states, weight, bias, target, epsilon: float, rows: int, grads: bool, matmul_t
    ):
        acc = torch.promote_types(states.dtype, torch.float32)  # float32, or float64
        V = weight.size(0)
        # Under autocast the matmuls pick their own dtype; otherwise they run in `acc`.
        autocast = torch.is_autocast_enabled(states.device.type)
        w = weight if autocast else weight.to(acc)
        loss = torch.zeros((), dtype=acc, device=states.device)
        nll = torch.zeros((), dtype=acc, device=states.device)
        if grads:
            grad_states = torch.empty_like(states)
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            grad_bias = None if bias is None else torch.zeros(V, dtype=acc, device=bias.device)
        for start in range(0, states.size(0), rows):
            h, t = states[start : start + rows], target[start : start + rows]
            log_probs = torch.log_softmax(matmul_t(h, weight, bias).to(acc), dim=-1)
            chunk_nll = -log_probs.gather(-1, t[:, None])
            nll += chunk_nll.sum()
            loss += (1.0 - epsilon) * chunk_nll.sum() - epsilon / V * log_probs.sum()
            if not grads:
                continue
            g = _minus_smoothed_target_(log_probs.exp_(), t, epsilon)  # in the chunk's buffer
            grad_states[start : start + rows] = matmul_t(g, w.t())  # g @ w
            if autocast:  # the matmul in the autocast dtype, accumulated in `acc`
                grad_weight += torch.mm(g.t(), h)
            else:  # accumulated in place: no (V, D) temporary per chunk
                grad_weight.addmm_(g.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += g.sum(0)
        ctx.mark_non_differentiable(nll)
        if grads:
            ctx.weight_dtype = weight.dtype
            ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (
            grad_states * grad_loss.to(grad_states.dtype) if need[0] else None,
            (grad_weight * grad_loss).to(ctx.weight_dtype) if need[1] else None,
            (grad_bias * grad_loss).to(ctx.weight_dtype)
            if need[2] and grad_bias is not None
            else None,
            None,
            None,
            None,
            None,
            None,
        )


def translation_loss(
    model: Transformer,
    src: Tensor,
    tgt_in: Tensor,
    tgt_out: Tensor,
    epsilon: float,
    positions: Tensor | None = None,
    src_positions: Tensor | None = None,
    rows: Rows | None = None,
) -> LossOutput:
    """Teacher-forced loss of a batch. The output projection runs only on real target
    positions: padding costs no vocabulary-sized FLOPs.

    src (B, S), tgt_in (B, T) = BOS + target, tgt_out (B, T) = target + EOS, right-padded.
    `positions` (N,) are the flat positions of the real tokens of tgt_out, as a collated
    `Batch` carries them. Without them they are found from the padding mask, which on an
    accelerator makes the host wait for the device (the count decides a tensor's size).
    `src_positions`, those of src's real tokens, let the encoder skip source padding on an
    accelerator too (`Transformer.encode`). With `rows`, each row holds several pairs (`Rows`).
    The output layer may bring its own no-autograd `matmul_t` for the fused projection (the
    oneDNN layer that `seq2seq.kernels.onednn` swaps in does); else torch's kernel runs it.
    """
    states = model(src, tgt_in, src_positions, rows)  # (B, T, D)
    if positions is None:
        positions = (tgt_out != model.cfg.pad_id).reshape(-1).nonzero().squeeze(1)
    states = states.reshape(-1, states.size(-1)).index_select(0, positions)  # (N, D)
    target = tgt_out.reshape(-1).index_select(0, positions)  # (N,)
    weight, bias = model.output_projection()
    matmul_t = getattr(model.generator, "matmul_t", plain_matmul_t)
    return projected_cross_entropy(states, weight, bias, target, epsilon, matmul_t)
