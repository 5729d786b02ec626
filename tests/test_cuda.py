"""On a CUDA GPU: the model computes what it computes on a CPU, and a training step never makes
the host wait for the device. Skipped where no GPU is present (CI); run on a lent GPU."""

import copy

import pytest
import torch
from test_model import full_and_incremental_logits, random_ids, tiny_model
from test_search import random_batch
from test_search import tiny_model as search_model

from seq2seq.config import DecodeConfig
from seq2seq.data.batching import collate
from seq2seq.inference.search import beam_search, greedy_search
from seq2seq.training.module import batch_loss
from seq2seq.training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAD = 0


def test_on_a_gpu_incremental_decoding_equals_full_forward_in_float32():
    model = tiny_model(torch.float32).cuda()
    src, tgt = random_ids(3, 6).cuda(), random_ids(3, 7).cuda()
    src[0, 4:] = PAD
    full, steps = full_and_incremental_logits(model, src, tgt)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_on_a_gpu_the_forward_pass_equals_the_cpu_one():
    model = tiny_model(torch.float64)
    src, tgt = random_ids(3, 6), random_ids(3, 7)
    src[1, 3:] = PAD
    with torch.no_grad():
        on_cpu = model(src, tgt)
        on_gpu = model.cuda()(src.cuda(), tgt.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-10)


def test_on_a_gpu_beam_1_equals_greedy_in_tokens_and_scores():
    model, src = search_model(dtype=torch.float32), random_batch([5, 2, 9, 7])
    model, src = model.cuda(), src.cuda()
    settings = DecodeConfig(max_len_a=1.5, max_len_b=2, lenpen=0.6)
    greedy = greedy_search(model, src, settings)
    beam1 = beam_search(model, src, DecodeConfig(**{**vars(settings), "beam": 1}))
    assert [h[0].tokens for h in beam1] == [h[0].tokens for h in greedy]
    assert [h[0].score for h in beam1] == [h[0].score for h in greedy]


def padded_batch(lengths, row_tokens=None):
    """A collated batch of random pairs with these (source, target) lengths: padded on both
    sides; with `row_tokens`, pairs share rows."""
    triples = [
        (row, random_ids(1, n)[0].tolist(), random_ids(1, m)[0].tolist())
        for row, (n, m) in enumerate(lengths)
    ]
    return collate(triples, row_tokens)


@pytest.mark.parametrize("row_tokens", [None, 16])
def test_a_bf16_training_step_on_a_gpu_never_waits_on_the_host(row_tokens):
    """Forward, loss, backward, optimizer and schedule with the sync debugger set to raise:
    any .item(), nonzero or device-to-host copy in the step fails this test."""
    from seq2seq.config import OptimConfig

    model = tiny_model(torch.float32).cuda().train()
    optimizer, schedule = build_optimizer(model.parameters(), OptimConfig(), 32)
    batch = padded_batch(((5, 7), (9, 3), (2, 6)), row_tokens).to("cuda")
    losses = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = batch_loss(model, batch, 0.1)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(out.loss.detach())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss).item() for loss in losses)


@pytest.mark.parametrize("row_tokens", [None, 16])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 8e-2)])
def test_on_a_gpu_training_gradients_equal_the_cpu_float64_ones(dtype, tolerance, row_tokens):
    """Padded sources and targets through the GPU's attention kernels (memory-efficient
    attention under a key-padding mask, or under the per-sentence masks of shared rows; in
    bf16, flash attention for the causal decoder) give the loss and every gradient of the
    float64 CPU step, to the precision's rounding."""
    model = tiny_model(torch.float64, dropout=0.0).train()
    batch = padded_batch(((5, 7), (9, 3), (2, 6), (7, 9)), row_tokens)

    def loss_and_grads(model, batch, autocast_dtype=None):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = batch_loss(model, batch, 0.1)
        out.loss.backward()
        return out.loss.double().cpu(), {
            n: p.grad.double().cpu() for n, p in model.named_parameters()
        }

    ref_loss, ref_grads = loss_and_grads(model, batch)
    gpu_model = copy.deepcopy(model).float().cuda()
    autocast_dtype = None if dtype == torch.float32 else dtype
    loss, grads = loss_and_grads(gpu_model, batch.to("cuda"), autocast_dtype)
    assert abs(loss - ref_loss) <= tolerance * abs(ref_loss)
    for name, ref in ref_grads.items():
        error = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"
