"""Label-smoothed cross-entropy: the convention, the padding, the reference."""

import pytest
import torch
import torch.nn.functional as F

from seq2seq.config import preset
from seq2seq.nn.loss import (
    label_smoothed_cross_entropy,
    projected_cross_entropy,
    translation_loss,
)
from seq2seq.nn.transformer import Transformer
from seq2seq.training.module import batch_loss

PAD = 0


def logits_and_targets(N=12, V=9):
    torch.manual_seed(0)
    logits = torch.randn(N, V, dtype=torch.float64)
    target = torch.randint(1, V, (N,))
    target[[2, 7]] = PAD
    return logits, target


def test_epsilon_zero_equals_cross_entropy_ignoring_padding():
    logits, target = logits_and_targets()
    out = label_smoothed_cross_entropy(logits, target, epsilon=0.0, ignore_index=PAD)
    expected = F.cross_entropy(logits, target, ignore_index=PAD)
    torch.testing.assert_close(out.loss.double(), expected)
    torch.testing.assert_close(out.nll.double(), expected)
    assert out.n_tokens == 10


def test_padded_positions_contribute_nothing():
    logits, target = logits_and_targets()
    base = label_smoothed_cross_entropy(logits, target, epsilon=0.1, ignore_index=PAD)
    scrambled = logits.clone()
    scrambled[target == PAD] = 1000.0 * torch.randn(2, logits.size(1), dtype=torch.float64)
    again = label_smoothed_cross_entropy(scrambled, target, epsilon=0.1, ignore_index=PAD)
    assert again.loss.item() == base.loss.item()


def test_smoothed_loss_matches_a_hand_written_reference():
    logits, target = logits_and_targets()
    eps, V = 0.1, logits.size(1)
    out = label_smoothed_cross_entropy(logits, target, epsilon=eps, ignore_index=PAD)
    total, n = 0.0, 0
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        if t == PAD:
            continue
        z = max(row)
        log_norm = z + torch.tensor([r - z for r in row]).exp().sum().log().item()
        log_p = [r - log_norm for r in row]
        q = [eps / V + (1 - eps if v == t else 0.0) for v in range(V)]  # smoothed target
        total += -sum(qv * lp for qv, lp in zip(q, log_p, strict=True))
        n += 1
    assert out.loss.item() == pytest.approx(total / n, rel=1e-6)
    # The same convention as torch's own label smoothing.
    keep = target != PAD
    torch_ls = F.cross_entropy(logits[keep], target[keep], label_smoothing=eps)
    assert out.loss.item() == pytest.approx(torch_ls.item(), rel=1e-6)


def test_nll_is_reported_unsmoothed():
    logits, target = logits_and_targets()
    out = label_smoothed_cross_entropy(logits, target, epsilon=0.3, ignore_index=PAD)
    plain = F.cross_entropy(logits, target, ignore_index=PAD)
    assert out.nll.item() == pytest.approx(plain.item(), rel=1e-6)
    assert out.loss.item() != pytest.approx(plain.item(), rel=1e-3)


def test_translation_loss_equals_full_logits_loss_with_padding_ignored():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).double().eval()
    src = torch.randint(4, 30, (3, 6))
    tgt_out = torch.randint(4, 30, (3, 5))
    tgt_out[0, 3:] = PAD
    tgt_in = torch.cat([torch.full((3, 1), 2), tgt_out[:, :-1]], dim=1)
    tgt_in[0, 4:] = PAD
    out = translation_loss(model, src, tgt_in, tgt_out, epsilon=0.1)
    full_logits = model.project(model(src, tgt_in))
    expected = label_smoothed_cross_entropy(full_logits, tgt_out, 0.1, ignore_index=PAD)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.n_tokens == 13


@pytest.mark.parametrize("row_tokens", [None, 8])
def test_training_step_reads_nothing_back_from_the_device(row_tokens, accelerator_packing):
    """On a GPU, any op whose output size or Python value depends on tensor data (nonzero,
    a boolean-mask gather, .item()) makes the host wait for the device. A training step on a
    collated batch, forward and backward, runs none of them. The encoder packs its real
    tokens from the batch's host-made positions; finding them itself (nonzero) is CPU-only,
    and turned off here as on an accelerator (and so is oneDNN's CPU linear)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from seq2seq.data.batching import collate

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            index = args[1] if func is torch.ops.aten.index.Tensor else []
            bool_index = any(t is not None and t.dtype == torch.bool for t in index)
            self.ops.append("index(bool)" if bool_index else str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).train()
    items = [(0, [5, 6, 7, 3], [8, 9]), (1, [5, 3], [8, 9, 10, 11]), (2, [5, 6, 3], [8])]
    batch = collate(items, row_tokens)  # with row_tokens, pairs share rows (`Rows`)
    with Recorder() as seen:  # a plain model: no CPU kernels swapped in
        out = batch_loss(model, batch, 0.1)
        out.loss.backward()
    assert out.n_tokens == batch.n_tgt_tokens == 10
    assert batch.src.size(0) == (3 if row_tokens is None else 2)
    assert "aten.index_copy_" in seen.ops  # the encoder packed: source padding skipped
    reads_back = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "index(bool)"}
    assert "aten.addmm" in seen.ops and "aten.index_select" in seen.ops  # the recorder works
    assert reads_back.isdisjoint(seen.ops), reads_back & set(seen.ops)


def test_translation_loss_with_host_positions_equals_the_masked_one():
    from seq2seq.data.batching import collate

    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).double().eval()
    batch = collate([(0, [5, 6, 7, 3], [8, 9]), (1, [5, 3], [8, 9, 10, 11]), (2, [4, 3], [12])])
    given = translation_loss(
        model, batch.src, batch.tgt_in, batch.tgt_out, 0.1, batch.tgt_positions
    )
    found = translation_loss(model, batch.src, batch.tgt_in, batch.tgt_out, 0.1)
    assert given.loss.item() == found.loss.item() and given.n_tokens == found.n_tokens == 10


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.4])
def test_fused_gradient_equals_autograd_of_the_textbook_formula(epsilon):
    logits, target = logits_and_targets(N=10, V=7)
    fused = logits.clone().requires_grad_()
    label_smoothed_cross_entropy(fused, target, epsilon, ignore_index=PAD).loss.backward()
    plain = logits.clone().requires_grad_()
    keep = target != PAD
    log_p = torch.log_softmax(plain[keep], dim=-1)
    q = torch.full_like(log_p, epsilon / 7)
    q[torch.arange(int(keep.sum())), target[keep]] += 1 - epsilon
    (-(q * log_p).sum(-1).mean()).backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-6, atol=1e-12)


def test_fused_loss_passes_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4, 5])
    from seq2seq.nn.loss import _SmoothedCrossEntropy

    assert torch.autograd.gradcheck(
        lambda x: _SmoothedCrossEntropy.apply(x, target, 0.2)[0], (logits,)
    )


def test_bfloat16_logits_get_a_bfloat16_gradient_and_a_float32_loss():
    logits, target = logits_and_targets()
    low = logits.to(torch.bfloat16).requires_grad_()
    out = label_smoothed_cross_entropy(low, target, 0.1, ignore_index=PAD)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and low.grad.dtype == torch.bfloat16


def projection_problem(N=11, D=5, V=9, bias=True):
    torch.manual_seed(2)
    states = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    target = torch.randint(1, V, (N,))
    return states, weight, b, target


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_projection_loss_equals_full_logits_loss_and_gradients(
    monkeypatch, chunk_rows, bias
):
    from seq2seq.nn import loss as loss_module

    monkeypatch.setitem(loss_module.CHUNK_ELEMENTS, "cpu", chunk_rows * 9)  # rows per chunk
    states, weight, b, target = projection_problem(bias=bias)
    out = projected_cross_entropy(states, weight, b, target, 0.1)
    (out.loss * 3.0).backward()  # a non-unit upstream gradient is scaled through
    got = [t.grad.clone() for t in (states, weight, b) if t is not None]
    for t in (states, weight, b):
        if t is not None:
            t.grad = None
    ref = label_smoothed_cross_entropy(F.linear(states, weight, b), target, 0.1)
    (ref.loss * 3.0).backward()
    want = [t.grad for t in (states, weight, b) if t is not None]
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.nll, ref.nll)
    assert out.n_tokens == ref.n_tokens == 11
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_chunked_projection_loss_under_no_grad_builds_no_gradients():
    states, weight, b, target = projection_problem()
    with torch.no_grad():
        out = projected_cross_entropy(states, weight, b, target, 0.1)
    assert not out.loss.requires_grad
    ref = label_smoothed_cross_entropy(F.linear(states, weight, b), target, 0.1)
    torch.testing.assert_close(out.loss, ref.loss.detach())


def test_chunked_projection_loss_under_bf16_autocast_is_float32_and_close():
    states, weight, _, target = projection_problem(N=64, D=32, V=50, bias=False)
    states, weight = (t.detach().float().requires_grad_() for t in (states, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = projected_cross_entropy(states, weight, None, target, 0.1)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert states.grad.dtype == weight.grad.dtype == torch.float32
    ref = label_smoothed_cross_entropy(F.linear(states, weight), target, 0.1)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
