"""The Transformer is the paper's: parameter counts, masks, padding, caching, positions."""

import math

import pytest
import torch

from seq2seq.config import ModelConfig, preset
from seq2seq.data.batching import collate
from seq2seq.nn.cache import select_rows_
from seq2seq.nn.transformer import Transformer, sinusoidal_positions

PAD = 0


def closed_form_parameters(V: int, d: int, d_ff: int, n_enc: int, n_dec: int) -> int:
    """Tied joint embedding, post-norm, biases on every projection, no output bias."""
    attention = 4 * (d * d + d)  # W_Q, W_K, W_V, W_O with biases
    ffn = d * d_ff + d_ff + d_ff * d + d
    layer_norm = 2 * d
    encoder_layer = attention + ffn + 2 * layer_norm
    decoder_layer = 2 * attention + ffn + 3 * layer_norm
    return V * d + n_enc * encoder_layer + n_dec * decoder_layer


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [("base", 63_082_496), ("big", 214_245_376)])
def test_base_and_big_have_the_paper_parameter_count(name, expected):
    cfg = preset(name, src_vocab_size=37000, tgt_vocab_size=37000)
    model = Transformer(cfg)
    closed = closed_form_parameters(
        37000, cfg.d_model, cfg.d_ff, cfg.n_encoder_layers, cfg.n_decoder_layers
    )
    assert closed == expected
    assert n_params(model) == expected


def test_separate_vocabularies_get_separate_embeddings_and_tied_output():
    cfg = preset("tiny", src_vocab_size=40, tgt_vocab_size=30)
    model = Transformer(cfg)
    assert model.src_embed.tokens is not model.tgt_embed.tokens
    assert model.generator.weight is model.tgt_embed.tokens.weight  # tied to the target embedding
    shared = closed_form_parameters(40, 32, 64, 2, 2)
    assert n_params(model) == shared + 30 * 32
    untied = Transformer(preset("tiny", src_vocab_size=40, tgt_vocab_size=30, tie_output=False))
    assert n_params(untied) == shared + 2 * 30 * 32


def test_pre_norm_adds_one_final_layernorm_per_stack():
    post = Transformer(preset("tiny", src_vocab_size=50, tgt_vocab_size=50))
    pre = Transformer(preset("tiny", src_vocab_size=50, tgt_vocab_size=50, pre_norm=True))
    assert n_params(pre) - n_params(post) == 2 * 2 * 32


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)


def test_position_encodings_equal_the_formula():
    d, P = 16, 50
    table = sinusoidal_positions(P, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def tiny_model(dtype=torch.float32, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = preset("tiny", src_vocab_size=50, tgt_vocab_size=50, **overrides)
    return Transformer(cfg).to(dtype).eval()


def random_ids(B: int, L: int) -> torch.Tensor:
    return torch.randint(4, 50, (B, L))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_changing_future_target_tokens_never_changes_earlier_outputs(pre_norm):
    model = tiny_model(pre_norm=pre_norm)
    src, tgt = random_ids(2, 9), random_ids(2, 8)
    changed = tgt.clone()
    changed[:, 5:] = random_ids(2, 3)
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_outputs_are_the_same_alone_and_inside_a_padded_batch():
    model = tiny_model(torch.float64)
    src_a, tgt_a = random_ids(1, 5), random_ids(1, 4)
    src_b, tgt_b = random_ids(1, 9), random_ids(1, 7)
    src = torch.full((2, 9), PAD)
    tgt = torch.full((2, 7), PAD)
    src[0, :5], src[1] = src_a[0], src_b[0]
    tgt[0, :4], tgt[1] = tgt_a[0], tgt_b[0]
    with torch.no_grad():
        batched = model(src, tgt)
        alone_a, alone_b = model(src_a, tgt_a), model(src_b, tgt_b)
    torch.testing.assert_close(batched[0, :4], alone_a[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(batched[1], alone_b[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("found_by", ["model", "host"])
def test_encoder_and_cross_attention_projections_skip_padding_with_the_unpacked_gradients(
    found_by, monkeypatch
):
    """The real source tokens found by the model (CPU) or given as a batch's host-made
    `src_positions` (any device) give the padded path's states and gradients."""
    from seq2seq import layout

    model = tiny_model(torch.float64)
    src = random_ids(3, 6)
    src[0, 2:], src[2, 4:] = PAD, PAD  # 2 + 6 + 4 = 12 real tokens out of 18
    tgt = random_ids(3, 4)
    positions = (src != PAD).flatten().nonzero().squeeze(1) if found_by == "host" else None
    rows_seen, kv_rows_seen = [], []
    model.encoder_layers[0].ffn.w1.register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].shape[:-1].numel())
    )
    model.decoder_layers[0].cross_attn.kv.register_forward_hook(
        lambda module, args, out: kv_rows_seen.append(args[0].shape[:-1].numel())
    )

    def grads_and_states():
        model.zero_grad()
        states = model(src, tgt, positions)
        states.pow(2).sum().backward()
        return states, [p.grad.clone() for p in model.parameters()]

    packed_states, packed_grads = grads_and_states()
    monkeypatch.setattr(layout.Packing, "of", classmethod(lambda cls, real, index=None: None))
    padded_states, padded_grads = grads_and_states()
    assert rows_seen == [12, 18]  # the feed-forward network saw only real tokens
    assert kv_rows_seen == [12, 18]  # and so did the cross-attention key/value projection
    monkeypatch.undo()
    assert model.encode(src).states[0, 2:].abs().sum() == 0  # padding rows of memory are zero
    torch.testing.assert_close(packed_states, padded_states, rtol=0, atol=1e-10)
    for packed, padded in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-10)


def test_only_host_positions_pack_on_an_accelerator_so_its_steps_never_wait_on_the_host():
    from seq2seq.layout import Packing

    real = torch.ones(2, 3, dtype=torch.bool, device="meta")  # any non-CPU device
    assert Packing.of(real) is None  # finding the real tokens would read the device
    given = Packing.of(real, torch.arange(5, device="meta"))  # a batch's host-made positions
    assert given is not None and (given.B, given.L) == (2, 3)
    assert Packing.of(real, torch.arange(6, device="meta")) is None  # no padding: no packing
    assert Packing.of(torch.tensor([[True, True], [True, False]])) is not None
    assert Packing.of(torch.ones(2, 2, dtype=torch.bool)) is None  # no padding: nothing to skip


def full_and_incremental_logits(model, src, tgt, reorder=None, capacity=None):
    """Logits of the full forward pass and of token-by-token decoding with the cache."""
    with torch.no_grad():
        memory = model.encode(src)
        full = model.project(model.decode(tgt, memory))
        cache, steps = model.new_cache(capacity), []
        for t in range(tgt.size(1)):
            if reorder is not None and t == reorder[0]:
                index = reorder[1]
                cache.reorder(index)
                memory, src, tgt, full = memory.select(index), src[index], tgt[index], full[index]
                steps = [s[index] for s in steps]
            steps.append(model.decode_step(tgt[:, t : t + 1], memory, cache)[:, 0])
    return full, torch.stack(steps, dim=1)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_incremental_decoding_equals_full_forward_in_float64(pre_norm):
    model = tiny_model(torch.float64, pre_norm=pre_norm)
    src, tgt = random_ids(3, 6), random_ids(3, 7)
    src[0, 4:] = PAD
    full, steps = full_and_incremental_logits(model, src, tgt)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


def test_incremental_decoding_equals_full_forward_in_float32():
    model = tiny_model(torch.float32)
    src, tgt = random_ids(3, 6), random_ids(3, 7)
    full, steps = full_and_incremental_logits(model, src, tgt)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_incremental_decoding_equals_full_forward_after_reorder():
    model = tiny_model(torch.float64)
    src, tgt = random_ids(4, 6), random_ids(4, 7)
    index = torch.tensor([2, 2, 0])  # beams follow rows 2, 2, 0; rows 1 and 3 are dropped
    full, steps = full_and_incremental_logits(model, src, tgt, reorder=(3, index))
    assert steps.shape == (3, 7, 50)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_a_cache_that_outgrows_its_capacity_keeps_every_position(capacity):
    """Self-attention buffers hold `capacity` positions and double when full; reordered rows
    before and after a growth keep their pasts."""
    model = tiny_model(torch.float64)
    src, tgt = random_ids(4, 6), random_ids(4, 7)
    index = torch.tensor([3, 0, 0])
    full, steps = full_and_incremental_logits(model, src, tgt, (2, index), capacity)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "rows", [[2, 2, 0], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0], [3, 3, 3, 3, 3, 3]]
)
def test_rows_selected_in_place_equal_indexing_whatever_rows_overlap(rows):
    """select_rows_ copies only the rows that move, yet reads every source before it writes:
    rows that are both read and overwritten (a swap, a reversal) come out as x[rows]."""
    x = torch.randn(6, 3, 2)
    rows = torch.tensor(rows)
    expected = x[rows]
    for dim in (0, 1):
        y = x.transpose(0, dim).clone(memory_format=torch.contiguous_format)
        out = select_rows_(y, rows, dim=dim)
        torch.testing.assert_close(out.transpose(0, dim), expected, rtol=0, atol=0)


def test_two_reorders_before_the_next_step_keep_the_second_of_the_first():
    """Two reorders in a row compose: rows `second` of the rows `first`."""
    model = tiny_model(torch.float64)
    src, tgt = random_ids(4, 6), random_ids(4, 7)
    first, second = torch.tensor([3, 1, 0, 1]), torch.tensor([1, 1, 2])
    kept = first[second]  # original rows 1, 1, 0
    with torch.no_grad():
        full = model.project(model.decode(tgt, model.encode(src)))[kept]
        memory, cache = model.encode(src), model.new_cache()
        for t in range(3):
            model.decode_step(tgt[:, t : t + 1], memory, cache)
        cache.reorder(first)
        cache.reorder(second)
        memory, tgt = memory.select(kept), tgt[kept]
        steps = [model.decode_step(tgt[:, t : t + 1], memory, cache)[:, 0] for t in range(3, 7)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 3:], rtol=0, atol=1e-10)


def test_several_new_tokens_at_once_after_a_cached_prefix_match_full_forward():
    model = tiny_model(torch.float64)
    src, tgt = random_ids(2, 6), random_ids(2, 7)
    with torch.no_grad():
        memory = model.encode(src)
        full = model.project(model.decode(tgt, memory))
        cache = model.new_cache()
        first = model.decode_step(tgt[:, :3], memory, cache)
        rest = model.decode_step(tgt[:, 3:], memory, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=0, atol=1e-10)


def test_cross_attention_keys_and_values_are_computed_once_per_sentence():
    model = tiny_model()
    calls = []
    model.decoder_layers[0].cross_attn.kv.register_forward_hook(lambda *a: calls.append(1))
    src, tgt = random_ids(2, 6), random_ids(2, 5)
    with torch.no_grad():
        memory, cache = model.encode(src), model.new_cache()
        for t in range(5):
            model.decode_step(tgt[:, t : t + 1], memory, cache)
    assert len(calls) == 1
    assert cache.length == 5 and cache.layers[0].self_length == 5
    assert cache.layers[0].self_k.shape == (16, 2, 4, 8)  # time-major: (capacity, B, H, Dh)
    assert cache.layers[0].cross_k.shape == (2, 4, 6, 8)  # (B, H, S, Dh)


def test_too_long_input_names_max_positions():
    model = tiny_model(max_positions=8)
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(random_ids(1, 9))


def test_padding_embedding_row_is_zero():
    model = tiny_model()
    assert torch.count_nonzero(model.src_embed.tokens.weight[PAD]) == 0


def test_beams_sharing_their_sentences_cross_attention_match_the_full_forward_pass():
    """Beam layout: step 0 has one row per sentence, then k rows per sentence (sentence-major)
    share the sentence's memory and cross-attention K/V; finished sentences leave."""
    model, k, BOS = tiny_model(torch.float64), 3, 2
    src = random_ids(2, 6)
    src[1, 4:] = PAD
    tgt = random_ids(2 * k, 5)
    tgt[:, 0] = BOS
    with torch.no_grad():
        full = model.project(model.decode(tgt, model.encode(src.repeat_interleave(k, dim=0))))
        memory, cache = model.encode(src), model.new_cache()
        first = model.decode_step(tgt[::k, :1], memory, cache)  # (2, 1, V): one row per sentence
        torch.testing.assert_close(first[:, 0], full[::k, 0], rtol=0, atol=1e-10)
        cache.reorder_beams(torch.arange(2).repeat_interleave(k), sentences=None)
        for t in (1, 2):
            step = model.decode_step(tgt[:, t : t + 1], memory, cache)[:, 0]
            torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
        assert cache.layers[0].cross_k.size(0) == 2  # one copy per sentence, not per beam
        keep = torch.tensor([1])  # sentence 0 finished: only sentence 1's beams go on
        rows = torch.arange(k, 2 * k)
        cache.reorder_beams(rows, sentences=keep)
        memory = memory.select(keep)
        for t in (3, 4):
            step = model.decode_step(tgt[rows, t : t + 1], memory, cache)[:, 0]
            torch.testing.assert_close(step, full[rows, t], rtol=0, atol=1e-10)


@pytest.mark.parametrize("row_tokens", [None, 12])
def test_on_an_accelerator_the_training_forward_compiles_to_one_graph_for_every_batch_shape(
    row_tokens, monkeypatch, accelerator_packing
):
    """`--trainer.compile` on a GPU: nothing in the forward pass breaks the graph (no
    `.item()`, no data-dependent shape, no symbolic bool handed to SDPA), and with dynamic
    shapes batches of other sizes reuse that one graph instead of recompiling. Simulated on
    the CPU by taking the accelerator's paths: packing only from the batch's host-made
    source positions, and `nn.functional.dropout`."""

    cfg = preset("tiny", src_vocab_size=50, tgt_vocab_size=50, dropout=0.1)
    model = Transformer(cfg).train()
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=count_graphs, fullgraph=True, dynamic=True)
    for B, S, T in ((3, 7, 4), (5, 9, 3), (4, 4, 10)):  # no two sizes alike at first (duck sizing)
        src_lengths = [S - 2] + [S] * (B - 1)
        items = [
            (i, random_ids(1, n)[0].tolist(), random_ids(1, T)[0].tolist())
            for i, n in enumerate(src_lengths)
        ]
        batch = collate(items, row_tokens)  # with row_tokens, pairs share rows
        out = compiled(batch.src, batch.tgt_in, batch.src_positions, batch.rows)
        out.sum().backward()
    assert len(graphs) == 1
    assert "index_copy" in graphs[0].code  # the encoder packed inside the graph


@pytest.mark.parametrize("tie_output", [True, False])
def test_a_state_dict_from_before_the_generator_module_loads_to_the_same_model(tie_output):
    """Earlier checkpoints kept an untied output projection as `output_weight`/`output_bias`
    and a tied one only as the target embedding."""
    cfg = preset(
        "tiny", src_vocab_size=40, tgt_vocab_size=30, tie_output=tie_output, output_bias=True
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    old = dict(model.state_dict())
    old["output_bias"] = old.pop("generator.bias")
    weight = old.pop("generator.weight")
    if not tie_output:
        old["output_weight"] = weight
    loaded = Transformer(cfg)
    loaded.load_state_dict(old)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert (loaded.generator.weight is loaded.tgt_embed.tokens.weight) == tie_output
