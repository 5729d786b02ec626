"""Greedy and beam search: hand-worked cases, equivalences and the exhaustive optimum."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from seq2seq.config import DecodeConfig, preset
from seq2seq.inference.search import (
    BOS,
    EOS,
    PAD,
    _child_slots,
    _in_place,
    beam_search,
    greedy_search,
    max_output_lengths,
    search,
)
from seq2seq.nn.transformer import Memory, Transformer

A, B = 4, 5  # the two ordinary tokens of the scripted vocabulary {pad, unk, bos, eos, A, B}


class PrefixCache:
    """Remembers each row's prefix and follows reorders, like DecoderCache."""

    def __init__(self) -> None:
        self.prefixes: torch.Tensor | None = None
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        self.prefixes = self.prefixes.index_select(0, index)

    def reorder_beams(self, rows: torch.Tensor, sentences: torch.Tensor | None) -> None:
        self.reorder(rows)  # prefixes are per row; the scripted decoder has no per-sentence state


class ScriptedDecoder:
    """Next-token probabilities fixed per prefix; a prefix not in the script gets `default`."""

    def __init__(self, script: dict[tuple[int, ...], dict[int, float]], default=None):
        self.script, self.default, self.tgt_vocab_size = script, default or {EOS: 1.0}, 6
        self.rows_per_step: list[int] = []

    def encode(self, src: torch.Tensor) -> Memory:
        return Memory(src[:, :, None].double(), (src != PAD)[:, None, None, :])

    def new_cache(self, capacity: int | None = None) -> PrefixCache:
        return PrefixCache()

    def decode(self, tgt_in, memory, cache):
        old = cache.prefixes
        cache.prefixes = tgt_in if old is None else torch.cat([old, tgt_in], dim=1)
        cache.length += tgt_in.size(1)
        self.rows_per_step.append(tgt_in.size(0))
        rows = []
        for prefix in cache.prefixes.tolist():
            probs = torch.full((self.tgt_vocab_size,), 1e-30, dtype=torch.float64)
            for token, p in self.script.get(tuple(prefix[1:]), self.default).items():
                probs[token] = p
            rows.append(probs.log())
        return torch.stack(rows)[:, None, :]  # (R, 1, V): log-probs, the "states"

    def project(self, states):
        return states.clone()  # log-probs are valid logits


def lp(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


SRC = torch.tensor([[7, 8, EOS]])
# Greedy takes A (0.6) then EOS: 0.24. Beam 2 also keeps B, whose EOS gives 0.4 * 0.9 = 0.36.
GREEDY_TRAP = {(): {A: 0.6, B: 0.4}, (A,): {EOS: 0.4, A: 0.3, B: 0.3}, (B,): {EOS: 0.9, A: 0.1}}
# Without length penalty [A] (0.55 * 0.6 = 0.33) wins over [B, A] (0.45 * 0.9 * 0.7 = 0.2835);
# with alpha = 1 the longer one wins: log(0.2835) / (8/6) = -0.9454 > log(0.33) / (7/6) = -0.9503.
LENGTH_TRADE = {
    (): {A: 0.55, B: 0.45},
    (A,): {EOS: 0.6, B: 0.4},
    (B,): {A: 0.9, EOS: 0.1},
    (A, B): {EOS: 1.0},
    (B, A): {EOS: 0.7, A: 0.3},
}


def cfg(**kw) -> DecodeConfig:
    kw = {"lenpen": 0.0, "max_len_a": 0.0, "max_len_b": 10, **kw}
    return DecodeConfig(**kw)


def test_beam_search_finds_the_hand_worked_best_that_greedy_misses():
    greedy = greedy_search(ScriptedDecoder(GREEDY_TRAP), SRC, cfg(beam=1))[0]
    assert [h.tokens for h in greedy] == [[A]]
    assert greedy[0].score == pytest.approx(math.log(0.24), abs=1e-6)
    beam = beam_search(ScriptedDecoder(GREEDY_TRAP), SRC, cfg(beam=2, nbest=2))[0]
    assert [h.tokens for h in beam] == [[B], [A]]
    assert [h.score for h in beam] == pytest.approx([math.log(0.36), math.log(0.24)], abs=1e-6)


def test_length_penalty_changes_the_winner_as_worked_out_by_hand():
    plain = beam_search(ScriptedDecoder(LENGTH_TRADE), SRC, cfg(beam=2, nbest=2))[0]
    assert [h.tokens for h in plain] == [[A], [B, A]]
    assert [h.score for h in plain] == pytest.approx([math.log(0.33), math.log(0.2835)], abs=1e-6)
    penalized = beam_search(ScriptedDecoder(LENGTH_TRADE), SRC, cfg(beam=2, nbest=2, lenpen=1.0))
    best, second = penalized[0][:2]
    assert (best.tokens, second.tokens) == ([B, A], [A])
    assert best.score == pytest.approx(math.log(0.2835) / lp(3, 1.0), abs=1e-6)
    assert second.score == pytest.approx(math.log(0.33) / lp(2, 1.0), abs=1e-6)
    assert best.log_prob == pytest.approx(math.log(0.2835), abs=1e-6)


def test_nbest_is_sorted_by_score():
    hyps = beam_search(ScriptedDecoder(LENGTH_TRADE), SRC, cfg(beam=3, nbest=3, lenpen=0.6))[0]
    scores = [h.score for h in hyps]
    assert len(hyps) == 3 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("beam", [1, 3])
def test_pad_and_bos_are_never_emitted_even_when_most_probable(beam):
    script = {(): {PAD: 0.5, BOS: 0.3, A: 0.2}, (A,): {BOS: 0.9, EOS: 0.1}}
    hyps = search(ScriptedDecoder(script), SRC, cfg(beam=beam))[0]
    assert hyps[0].tokens == [A]


@pytest.mark.parametrize("beam", [1, 2])
def test_min_len_forbids_early_eos_and_max_len_forces_it(beam):
    wants_to_stop = {(): {EOS: 0.9, A: 0.1}}
    hyps = search(ScriptedDecoder(wants_to_stop), SRC, cfg(beam=beam, min_len=2))[0]
    assert len(hyps[0].tokens) == 2  # A, then EOS is forbidden once more, then the script ends
    never_stops = ScriptedDecoder({}, default={A: 0.9, B: 0.1})
    hyps = search(never_stops, SRC, cfg(beam=beam, max_len_a=1.0, max_len_b=1))[0]
    assert hyps[0].tokens == [A] * 4  # floor(1.0 * 3 + 1) tokens, then EOS is forced


@pytest.mark.parametrize(("beam", "rows"), [(1, [2, 2, 2, 1, 1, 1]), (2, [2, 4, 4, 2, 2, 2])])
def test_finished_sentences_leave_the_batch(beam, rows):
    model = ScriptedDecoder({}, default={A: 0.9, B: 0.1})
    src = torch.tensor([[7, EOS, PAD, PAD, PAD], [7, 7, 7, 7, EOS]])  # max_len 2 and 5
    hyps = search(model, src, cfg(beam=beam, max_len_a=1.0, max_len_b=0))
    assert model.rows_per_step == rows
    assert [len(h[0].tokens) for h in hyps] == [2, 5]


def tiny_model(vocab: int = 20, dtype=torch.float64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", src_vocab_size=vocab, tgt_vocab_size=vocab, dropout=0.0))
    return model.to(dtype).eval()


def random_batch(lengths: list[int], vocab: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths) + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        src[i, n] = EOS
    return src


def test_beam_1_equals_greedy_in_tokens_and_scores():
    model, src = tiny_model(dtype=torch.float32), random_batch([5, 2, 9, 7])
    settings = cfg(max_len_a=1.5, max_len_b=2, lenpen=0.6)
    greedy = greedy_search(model, src, settings)
    beam1 = beam_search(model, src, DecodeConfig(**{**vars(settings), "beam": 1}))
    assert [h[0].tokens for h in beam1] == [h[0].tokens for h in greedy]
    assert [h[0].score for h in beam1] == [h[0].score for h in greedy]


def test_greedy_without_scores_gives_the_same_tokens_with_nan_scores():
    model, src = tiny_model(dtype=torch.float32), random_batch([5, 2, 9, 7, 1])
    settings = cfg(max_len_a=1.5, max_len_b=2, min_len=2)
    scored = greedy_search(model, src, settings)
    unscored = greedy_search(model, src, settings, scores=False)
    assert [h[0].tokens for h in unscored] == [h[0].tokens for h in scored]
    assert all(math.isfinite(h[0].score) for h in scored)
    assert all(math.isnan(h[0].score) and math.isnan(h[0].log_prob) for h in unscored)


def test_greedy_without_scores_keeps_the_rules_on_logits():
    # PAD most probable everywhere, EOS forbidden before min_len and forced at max_len.
    script = {(): {PAD: 0.5, EOS: 0.3, A: 0.2}, (A,): {PAD: 0.5, EOS: 0.1, B: 0.4}}
    hyp = greedy_search(
        ScriptedDecoder(script, default={PAD: 0.9, A: 0.1}),
        SRC,
        cfg(beam=1, min_len=1, max_len_a=0.0, max_len_b=3),
        scores=False,
    )[0][0]
    assert hyp.tokens == [A, B, A]


@pytest.mark.parametrize("beam", [1, 4])
def test_batched_search_equals_one_sentence_at_a_time(beam):
    model, src = tiny_model(), random_batch([6, 3, 8, 1, 5])
    settings = cfg(beam=beam, nbest=beam, max_len_a=1.0, max_len_b=3, lenpen=1.0)
    batched = search(model, src, settings)
    for i, hyps in enumerate(batched):
        n = int((src[i] != PAD).sum())
        alone = search(model, src[i : i + 1, :n], settings)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-9)


def exhaustive(model: Transformer, src: torch.Tensor, max_len: int, alpha: float):
    """Every output of 1..max_len tokens from {unk, A, B}, scored by a full forward pass."""
    outputs = [
        list(y) for n in range(1, max_len + 1) for y in itertools.product([1, A, B], repeat=n)
    ]
    scored = []
    for y in outputs:
        tgt_in = torch.tensor([[BOS, *y]])
        log_probs = F.log_softmax(model.project(model(src, tgt_in)), dim=-1)[0]
        total = sum(log_probs[t, tok].item() for t, tok in enumerate([*y, EOS]))
        scored.append((total / lp(len(y) + 1, alpha), y))
    return sorted(scored, reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_wide_beam_finds_the_exhaustive_optimum_and_ranking(alpha):
    model, src = tiny_model(vocab=6, seed=3), random_batch([4], vocab=6)
    settings = cfg(beam=64, nbest=39, max_len_a=0.0, max_len_b=3, lenpen=alpha)
    hyps = beam_search(model, src, settings)[0]
    expected = exhaustive(model, src, 3, alpha)
    assert len(expected) == 39
    assert [h.tokens for h in hyps] == [y for _, y in expected]
    assert [h.score for h in hyps] == pytest.approx([s for s, _ in expected], abs=1e-9)


def test_output_never_exceeds_the_model_position_limit():
    model, src = tiny_model(), random_batch([12])
    hyps = search(model, src, cfg(beam=2, max_len_a=5.0), max_positions=6)
    assert len(hyps[0][0].tokens) <= 5


@pytest.mark.parametrize(("a", "b"), [(1e19, 10), (0.0, 10**19)])
def test_a_huge_length_rule_gives_the_position_limit_not_one_token(a, b):
    """floor(a * |x| + b) beyond int64 once overflowed its cast to a negative length, which
    min_len then raised to 1."""
    src = torch.tensor([[7, 8, EOS], [7, EOS, PAD]])
    assert max_output_lengths(src, cfg(max_len_a=a, max_len_b=b), 48).tolist() == [47, 47]
    assert (max_output_lengths(src, cfg(max_len_a=a, max_len_b=b), None) > 0).all()


# [A] ends first with 0.54; beam 2 also keeps [B, A] and [B, B] (0.2 each), which end next step.
TOP_ENDS_FIRST = {(): {A: 0.6, B: 0.4}, (A,): {EOS: 0.9, A: 0.05, B: 0.05}, (B,): {A: 0.5, B: 0.5}}


def test_stop_best_ends_a_sentence_as_soon_as_its_best_candidate_ends():
    """With a length penalty and room to grow, `beam` waits for K ended hypotheses."""
    rows = {}
    for stop in ("beam", "best"):
        decoder = ScriptedDecoder(TOP_ENDS_FIRST)
        hyps = beam_search(decoder, SRC, cfg(beam=2, stop=stop, lenpen=1.0, max_len_b=50))[0]
        assert hyps[0].tokens == [A] and hyps[0].score == pytest.approx(math.log(0.54) / lp(2, 1))
        rows[stop] = decoder.rows_per_step
    assert rows == {"beam": [1, 2, 2], "best": [1, 2]}


def test_without_length_penalty_stop_beam_also_ends_once_nothing_can_beat_the_best():
    """[A] (0.54) ended; the live beams (0.2 each) can only fall: no need to wait for them."""
    decoder = ScriptedDecoder(TOP_ENDS_FIRST)
    hyps = beam_search(decoder, SRC, cfg(beam=2, stop="beam", max_len_b=50))[0]
    assert hyps[0].tokens == [A] and decoder.rows_per_step == [1, 2]


def random_script(seed: int, depth: int = 5) -> dict[tuple[int, ...], dict[int, float]]:
    """Random next-token distributions over {unk, eos, A, B} for every prefix up to `depth`."""
    g = torch.Generator().manual_seed(seed)
    script = {}
    for n in range(depth):
        for prefix in itertools.product([1, A, B], repeat=n):
            probs = torch.rand(4, generator=g, dtype=torch.float64) ** 3
            script[prefix] = dict(zip([1, EOS, A, B], (probs / probs.sum()).tolist(), strict=True))
    return script


# Beam 2, no length penalty. Step 1 ends [B] (0.3) and keeps [A, A] (0.45) and [B, B] (0.2);
# step 2 ends [B, B] (0.18) beside the best candidate [A, A, A] (0.405), whose EOS is certain.
K_ENDED_FIRST = {
    (): {A: 0.5, B: 0.5},
    (A,): {A: 0.9, EOS: 0.1},
    (B,): {EOS: 0.6, B: 0.4},
    (A, A): {A: 0.9, EOS: 0.1},
    (B, B): {EOS: 0.9, B: 0.1},
}


def test_stop_best_goes_on_past_k_ended_hypotheses_while_a_live_beam_scores_higher():
    """fairseq's rule stops once 2 have ended ([B], [B, B]); CTranslate2's goes on to the
    likelier [A, A, A]."""
    found = {}
    for stop in ("beam", "best"):
        found[stop] = beam_search(ScriptedDecoder(K_ENDED_FIRST), SRC, cfg(beam=2, stop=stop))[0]
    assert found["beam"][0].tokens == [B]
    assert found["beam"][0].score == pytest.approx(math.log(0.3))
    assert found["best"][0].tokens == [A, A, A]
    assert found["best"][0].score == pytest.approx(math.log(0.405))


def test_without_length_penalty_stop_best_finds_a_1best_as_likely_as_stop_beams():
    better = 0
    for seed in range(20):
        found = {}
        for stop in ("beam", "best"):
            decoder = ScriptedDecoder(random_script(seed))
            found[stop] = beam_search(decoder, SRC, cfg(beam=3, max_len_b=6, stop=stop))[0][0]
        assert found["best"].score >= found["beam"].score
        better += found["best"].score > found["beam"].score
    assert better > 0


def without_early_end(monkeypatch) -> None:
    """No bound: only the rule (or the length limit) ends a sentence."""
    unreachable = lambda log_prob, *_: torch.full_like(log_prob, math.inf)  # noqa: E731
    monkeypatch.setattr("seq2seq.inference.search._best_reachable", unreachable)


@pytest.mark.parametrize("stop", ["beam", "best"])
@pytest.mark.parametrize("lenpen", [0.0, 0.6, 2.0, -0.5])
@pytest.mark.parametrize("nbest", [1, 3])
def test_the_exact_early_end_never_changes_a_rules_nbest(monkeypatch, stop, lenpen, nbest):
    """The same hypotheses and scores as the rule alone, in no more decoder rows."""
    rows = {"exact": 0, "wait": 0}
    for seed in range(30):
        found = {}
        for way in rows:
            if way == "wait":
                without_early_end(monkeypatch)
            decoder = ScriptedDecoder(random_script(seed))
            settings = cfg(beam=3, nbest=nbest, lenpen=lenpen, max_len_b=6, stop=stop)
            hyps = beam_search(decoder, SRC, settings)[0]
            found[way] = [(h.tokens, h.score) for h in hyps]
            rows[way] += sum(decoder.rows_per_step)
            monkeypatch.undo()
        assert found["exact"] == found["wait"]
    assert rows["exact"] <= rows["wait"]
    if lenpen == 0.0 and nbest < 3:  # an earlier ended hypothesis beat every live beam
        assert rows["exact"] < rows["wait"]


def test_the_exact_early_end_keeps_a_real_models_nbest(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", src_vocab_size=12, tgt_vocab_size=12, dropout=0.0)).eval()
    src = torch.randint(4, 12, (6, 5))
    src[:, -1] = EOS
    for lenpen, stop in itertools.product((0.0, 1.0), ("beam", "best")):
        settings = cfg(beam=4, nbest=2, lenpen=lenpen, max_len_b=8, stop=stop)
        exact = beam_search(model, src, settings)
        with monkeypatch.context() as m:
            without_early_end(m)
            wait = beam_search(model, src, settings)
        assert [[(h.tokens, h.score) for h in hs] for hs in exact] == [
            [(h.tokens, h.score) for h in hs] for hs in wait
        ]


def test_an_unknown_stop_rule_is_refused():
    with pytest.raises(ValueError, match="decode.stop='never' must be 'beam' or 'best'"):
        DecodeConfig(stop="never")


@pytest.mark.parametrize("beam", [1, 4])
def test_float32_search_scores_are_the_log_probabilities_of_a_full_forward_pass(beam):
    """The float32 CPU path (the output projection on oneDNN with a packed weight, the
    log-softmax written over the logits) scores each hypothesis as the model does."""
    model, src = tiny_model(dtype=torch.float32), random_batch([6, 3, 8])
    settings = cfg(beam=beam, nbest=beam, max_len_a=1.0, max_len_b=3)
    for i, hyps in enumerate(search(model, src, settings)):
        n = int((src[i] != PAD).sum())
        for h in hyps:
            tgt_in = torch.tensor([[BOS, *h.tokens]])
            with torch.inference_mode():
                logits = model.project(model(src[i : i + 1, :n], tgt_in))
            log_probs = F.log_softmax(logits.double(), dim=-1)[0]
            want = sum(log_probs[t, tok].item() for t, tok in enumerate([*h.tokens, EOS]))
            assert h.log_prob == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("limit", ["_GLIBC_MMAP_BYTES", "_CPU_PIECE_ROWS"])
@pytest.mark.parametrize("beam", [1, 3])
def test_a_step_projected_in_pieces_gives_the_same_hypotheses(beam, limit, monkeypatch):
    """On a CPU a step's rows are projected and ranked in pieces of logits under glibc's mmap
    size and of at most _CPU_PIECE_ROWS rows; in pieces of 2 rows (either limit), with min_len
    and max_len applying to some rows, nothing changes."""
    model, src = tiny_model(), random_batch([6, 3, 8, 1, 5])
    settings = cfg(beam=beam, nbest=beam, max_len_a=0.5, max_len_b=2, min_len=2, lenpen=1.0)
    whole = search(model, src, settings)
    projected_rows = []
    project = model.project
    monkeypatch.setattr(model, "project", lambda s: projected_rows.append(len(s)) or project(s))
    row_bytes = model.tgt_vocab_size * 8  # float64
    two_rows = 2 * row_bytes + 1 if limit == "_GLIBC_MMAP_BYTES" else 2
    monkeypatch.setattr(f"seq2seq.inference.search.{limit}", two_rows)
    pieces = search(model, src, settings)
    assert max(projected_rows) == 2 and len(projected_rows) > 2 * len(whole)
    assert [[h.tokens for h in hyps] for hyps in pieces] == [
        [h.tokens for h in hyps] for hyps in whole
    ]
    for got, want in zip(pieces, whole, strict=True):  # a matmul's rounding may vary with rows
        assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-12)


@pytest.mark.parametrize("vocab", [8000, 64 * 30 + 37, 64 * 10])
def test_two_stage_top_n_gives_topks_values_and_ids(vocab):
    """`_top_n` (chunk maxima, then the best chunks' columns, then the tail that fills no
    chunk) returns torch's topk: distinct values, rows whose best sit in one chunk, in the
    tail, or among -inf (a row forced to EOS); too few chunks fall back to topk itself."""
    from seq2seq.inference.search import _top_n

    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randperm(vocab, generator=g).float() for _ in range(6)])
    x[1, :10] += vocab  # the ten best in the first chunk
    x[2, -10:] += vocab  # in the last columns (the tail where vocab % 64)
    x[3] = -math.inf
    x[3, [EOS, 100]] = torch.tensor([-0.5, -1.5])  # two finite, the rest -inf
    values, ids = _top_n(x, 10)
    want = x.topk(10, dim=-1)
    torch.testing.assert_close(values, want.values, rtol=0, atol=0)
    finite = torch.isfinite(want.values)  # -inf ties may come in another order
    assert torch.equal(ids[finite], want.indices[finite])
    assert torch.equal(x.gather(1, ids), values)


@pytest.mark.parametrize("vocab", [640, 650, 64])
def test_two_stage_max_gives_maxs_values_and_first_ids(vocab):
    """`_top_1` (chunk maxima, the first chunk with the row's maximum, the first column in it
    with it) returns torch's max, the first of equal maxima included: ties inside a chunk,
    across chunks, a row of -inf but EOS; a vocabulary of partial or too few chunks takes
    max itself, and so do fewer rows than the stages pay off for."""
    from seq2seq.inference.search import _TOP_1_STAGED_ROWS, _top_1

    g = torch.Generator().manual_seed(0)
    rows = _TOP_1_STAGED_ROWS + 1  # the two stages run (640 columns: ten chunks)
    x = torch.stack([torch.randperm(vocab, generator=g).float() for _ in range(rows)])
    x[1, [3, 9]] = vocab + 1.0  # equal maxima in one chunk
    x[2, [vocab - 1, 70 % vocab]] = vocab + 1.0  # in two chunks, the later first in the row
    x[3] = -math.inf
    x[3, EOS] = -0.5
    for some in (x, x[:4]):  # staged, then as few rows as a sentence at a time has
        values, ids = _top_1(some)
        want = some.max(dim=-1, keepdim=True)
        assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
        assert ids[1, 0] == 3 and ids[3, 0] == EOS


def test_beam_search_over_a_large_vocabulary_matches_plain_topk(monkeypatch):
    """With a vocabulary of 640 pieces (ten chunks of 64: the two-stage top-n runs), beam
    search returns what it returns with torch's topk in its place."""
    model, src = tiny_model(vocab=640), random_batch([6, 3, 8, 1, 5], vocab=640)
    settings = cfg(beam=4, nbest=4, max_len_a=1.0, max_len_b=3, lenpen=1.0)
    two_stage = search(model, src, settings)
    monkeypatch.setattr("seq2seq.inference.search._top_n", lambda x, n: x.topk(n, dim=-1))
    plain = search(model, src, settings)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in two_stage] == [
        [(h.tokens, h.score) for h in hyps] for hyps in plain
    ]


def test_each_parents_best_continuation_keeps_its_row_and_the_rest_fill_free_rows():
    """_child_slots: parents of beams 0..4 (best first) are rows 2, 2, 0, 4, 2 of their
    sentence. Beams 0, 2, 3 keep rows 2, 0, 4; beams 1 and 4 take rows 1 and 3, which no
    parent holds. A sentence whose beams all have parents of their own keeps every row."""
    parent = torch.tensor([[2, 2, 0, 4, 2], [3, 1, 4, 0, 2], [0, 0, 0, 0, 0]])
    slots = _child_slots(parent, 5)
    assert slots.tolist() == [[2, 1, 0, 4, 3], [3, 1, 4, 0, 2], [0, 1, 2, 3, 4]]
    # after the first step a sentence has one parent row for its K beams
    assert _child_slots(torch.zeros(1, 3, dtype=torch.long), 3).tolist() == [[0, 1, 2]]


def test_survivors_keep_their_place_and_later_ones_fill_the_gaps():
    alive = torch.tensor([True, False, True, False, True, True, False, True])
    assert _in_place(alive).tolist() == [0, 5, 2, 7, 4]
    assert _in_place(torch.ones(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    assert _in_place(torch.zeros(3, dtype=torch.bool)).tolist() == []


@pytest.mark.parametrize("stop", ["beam", "best"])
def test_where_beams_and_sentences_sit_in_the_batch_never_changes_the_output(stop, monkeypatch):
    """Rows stay in place where they can (`_in_place`, `_child_slots`) so that the cache
    copies few: the hypotheses and scores are those of the plain order, best beam first and
    sentences in input order."""
    model, src = tiny_model(), random_batch([6, 3, 8, 1, 5, 7, 2])
    settings = cfg(beam=4, nbest=2, max_len_a=1.0, max_len_b=4, lenpen=0.6, stop=stop)
    moved = []

    def spy(parent, K):
        slots = _child_slots(parent, K)
        moved.append(bool((slots != torch.arange(K)).any()))
        return slots

    monkeypatch.setattr("seq2seq.inference.search._child_slots", spy)
    placed = search(model, src, settings)
    assert any(moved)  # some beam did not sit where the plain order puts it
    monkeypatch.setattr("seq2seq.inference.search._in_place", lambda a: a.nonzero().squeeze(1))
    monkeypatch.setattr(
        "seq2seq.inference.search._child_slots",
        lambda parent, K: torch.arange(K).expand_as(parent),
    )
    plain = search(model, src, settings)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in placed] == [
        [(h.tokens, h.score) for h in hyps] for hyps in plain
    ]
