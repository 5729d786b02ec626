"""Several sentence pairs packed side by side into each row (`data.row_tokens`): every
sentence still gets exactly the states, loss and gradients it gets in a row of its own."""

import dataclasses

import pytest
import torch

from seq2seq.config import preset
from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID
from seq2seq.data.batching import collate
from seq2seq.nn.transformer import Transformer
from seq2seq.training.module import batch_loss


def pairs(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(4, 40, (k,), generator=g).tolist()  # noqa: E731
    lengths = torch.randint(1, 9, (n, 2), generator=g).tolist()
    return [(100 + i, ids(ls) + [EOS_ID], ids(lt)) for i, (ls, lt) in enumerate(lengths)]


def test_rows_hold_every_pair_once_in_order_within_their_capacity():
    items = pairs()
    batch = collate(items, row_tokens=12)
    rows = batch.rows
    assert batch.index.tolist() == [i for i, _, _ in items]  # every pair once, in order
    assert batch.src.size(0) < len(items)  # rows hold several pairs
    assert batch.src.size(1) <= 12 and batch.tgt_in.size(1) <= 12
    for r in range(batch.src.size(0)):
        k = rows.src_sentence[r]
        for sentence in range(int(k.max()) + 1):
            src = batch.src[r][k == sentence]
            assert rows.src_position[r][k == sentence].tolist() == list(range(len(src)))
            on_tgt = rows.tgt_sentence[r] == sentence
            assert batch.tgt_in[r][on_tgt][0] == BOS_ID and batch.tgt_out[r][on_tgt][-1] == EOS_ID
            assert rows.tgt_position[r][on_tgt].tolist() == list(range(int(on_tgt.sum())))
        assert (batch.src[r][k < 0] == PAD_ID).all()
        assert (batch.tgt_in[r][rows.tgt_sentence[r] < 0] == PAD_ID).all()
    plain = collate(items)
    assert (batch.n_src_tokens, batch.n_tgt_tokens) == (plain.n_src_tokens, plain.n_tgt_tokens)
    assert batch.tgt_out.flatten()[batch.tgt_positions].tolist() == (
        plain.tgt_out.flatten()[plain.tgt_positions].tolist()
    )
    assert batch.src.flatten()[batch.src_positions].tolist() == (
        plain.src.flatten()[plain.src_positions].tolist()
    )


def test_a_pair_longer_than_row_tokens_gets_a_row_of_its_own():
    items = [
        (0, [5] * 3 + [EOS_ID], [6] * 2),
        (1, [5] * 20 + [EOS_ID], [6] * 4),
        (2, [7, EOS_ID], [8]),
    ]
    batch = collate(items, row_tokens=8)
    assert batch.rows.src_sentence.max(dim=1).values.tolist() == [0, 0, 0]  # three rows
    assert batch.src.size(1) == 21  # the long pair's length


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("host_positions", [True, False])
def test_packed_rows_give_every_sentence_its_own_states_loss_and_gradients(
    pre_norm, host_positions
):
    torch.manual_seed(0)
    cfg = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0, pre_norm=pre_norm)
    model = Transformer(cfg).double().train()
    items = pairs()
    alone, packed = collate(items), collate(items, row_tokens=14)
    assert packed.src.size(0) < alone.src.size(0)

    def run(batch):
        if not host_positions:  # the model finds the real source tokens itself (CPU)
            batch = dataclasses.replace(batch, src_positions=None)
        model.zero_grad(set_to_none=True)
        states = model(batch.src, batch.tgt_in, batch.src_positions, batch.rows)
        out = batch_loss(model, batch, 0.1)
        out.loss.backward()
        real = states.reshape(-1, cfg.d_model)[batch.tgt_positions]  # sentence by sentence
        return real, out.loss, [p.grad.clone() for p in model.parameters()]

    states_a, loss_a, grads_a = run(alone)
    states_p, loss_p, grads_p = run(packed)
    torch.testing.assert_close(states_p, states_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss_p, loss_a, rtol=0, atol=1e-12)
    for g_p, g_a in zip(grads_p, grads_a, strict=True):
        torch.testing.assert_close(g_p, g_a, rtol=0, atol=1e-10)


def test_rows_move_to_a_device_with_their_batch():
    batch = collate(pairs(), row_tokens=12).to("meta")
    assert batch.rows.src_sentence.device.type == "meta"
    assert batch.rows.tgt_position.device.type == "meta"
