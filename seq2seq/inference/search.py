"""Greedy and beam search over the decoding interface: `encode`, then `decode` and `project`
once per output position.

Both searches are batched: every sentence of a batch advances together, one decoder step per
output position, with the key/value cache. A sentence that is done leaves the batch at once
(`memory.select` / `cache.reorder` with a shorter index), so it stops costing compute.

Conventions. B sentences, K beam size, V target vocabulary. Token ids are fixed: pad 0, unk 1,
bos 2, eos 3. Pad and bos are never emitted. A hypothesis is scored by the sum of its tokens'
log-probabilities, the final EOS included, divided by the GNMT length penalty (Wu et al., 2016)

    score(y) = log P(y | x) / ((5 + |y|) / 6) ** alpha,    |y| = tokens + 1 (the EOS),

with alpha = `DecodeConfig.lenpen` (0 turns it off). At most `max_len = floor(a * |x| + b)`
tokens are generated, |x| the source length with its EOS (after that, EOS is forced), and EOS
is forbidden before `min_len` tokens. Beam search ranks its candidates by raw log-probability
(as fairseq does) and applies the length penalty to finished hypotheses. It stops a sentence
once `K` hypotheses have finished (`stop='beam'`, the "early stopping" of fairseq and Hugging
Face), or with `stop='best'` as soon as the sentence's best candidate is EOS and `nbest`
hypotheses have finished, however many others have (CTranslate2's rule without a length
penalty). Candidates of one step all have the same length, so the best by raw log-probability
is also the best by score; with lenpen 0 every continuation of another beam scores lower
still, so `best` ends with the best hypothesis its beams reach, while `beam` may stop on K
ended ones while a live beam scores higher (and then a longer, likelier hypothesis is lost).

Either rule also ends a sentence sooner when nothing left can change its n-best: once
`nbest` hypotheses have finished and the n-th best score is at least what any live beam could
still reach, its log-probability (extensions only lower it) over the largest penalty its
length limit allows. That bound is exact, so the output is the rule's own; with lenpen 0 it
ends a sentence as soon as its best candidate is EOS, or sooner, when an earlier ended
hypothesis already beats every live beam.

Greedy search may skip the scores (`scores=False`, what `translate` asks when it prints text
alone): the most probable token is the largest logit, so no step then normalizes its logits
into log-probabilities, a pass over every row's whole vocabulary (CTranslate2's greedy search
skips it the same way unless asked for scores). Its hypotheses then carry NaN scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from seq2seq.config import DecodeConfig
from seq2seq.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.nn.cache import DecoderCache
from seq2seq.nn.transformer import Memory

PAD, UNK, BOS, EOS = PAD_ID, UNK_ID, BOS_ID, EOS_ID  # short names for the search code


class Decoder(Protocol):
    """What search needs from a model (seq2seq.nn.transformer.Transformer is one, and so is
    seq2seq.inference.ensemble.Ensemble, whose project gives log-probabilities)."""

    tgt_vocab_size: int

    def encode(self, src: Tensor) -> Memory: ...

    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        """An empty cache for decoding at most `capacity` positions (None: unknown)."""

    def decode(self, tgt_in: Tensor, memory: Memory, cache: DecoderCache) -> Tensor:
        """States (R, L, D) of the newest tokens tgt_in (R, L); the cache advances by L."""

    def project(self, states: Tensor) -> Tensor:
        """Logits (R, V) of states (R, D), in a new tensor: the search overwrites them."""


@dataclass
class Hypothesis:
    """One translation: target ids without BOS/EOS, its score and raw log-probability."""

    tokens: list[int]
    score: float
    """log_prob divided by the length penalty: what hypotheses are ranked by (NaN from a
    greedy search run without scores)."""
    log_prob: float
    """Sum of the log-probabilities of the tokens and the final EOS (NaN without scores)."""
    attention: Tensor | None = field(default=None, repr=False)
    """Cross-attention (len(tokens) + 1, S), filled only on request (seq2seq.inference.attention)."""


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |y|) / 6) ** alpha for a length |y| (EOS included)."""
    return ((5.0 + length) / 6.0) ** alpha


def max_output_lengths(src: Tensor, cfg: DecodeConfig, max_positions: int | None) -> Tensor:
    """Per sentence, floor(a * |x| + b) tokens, at least min_len and at most max_positions - 1.

    The cap leaves room for BOS: generating M tokens and EOS feeds M + 1 decoder positions.
    Both bounds apply in float64, before the cast to int64: a huge a or b (1e19) would
    overflow the cast to a negative length, and the minimum would then give one-token outputs.
    Without max_positions the cap is 2**62, exact in float64 and castable.
    """
    src_len = (src != PAD).sum(dim=1)  # (B,) source pieces + EOS
    max_len = torch.floor(cfg.max_len_a * src_len.double() + cfg.max_len_b)
    max_len = max_len.clamp(min=max(cfg.min_len, 1))
    limit = 2**62 if max_positions is None else max_positions - 1
    return max_len.clamp(max=limit).long()  # the cap wins over min_len (check_lengths)


def search(
    model: Decoder,
    src: Tensor,
    cfg: DecodeConfig,
    max_positions: int | None = None,
    scores: bool = True,
) -> list[list[Hypothesis]]:
    """Greedy search when cfg.beam == 1, else beam search.

    Args:
        model: a Decoder, in eval mode.
        src: (B, S) source ids, right-padded with 0.
        cfg: beam, nbest, lenpen, max_len_a, max_len_b, min_len.
        max_positions: the model's position limit (`model.cfg.max_positions`), or None.
        scores: False lets greedy search skip them (NaN scores, the same tokens); beam search
            ranks by them and always has them.

    Returns:
        Per sentence, in input order, up to cfg.nbest hypotheses, best score first.
    """
    if cfg.beam == 1:
        return greedy_search(model, src, cfg, max_positions, scores)
    return beam_search(model, src, cfg, max_positions)


@dataclass
class _StepRules:
    """What may be emitted at one step: never pad or bos; no EOS before min_len; only EOS at
    max_len (rows in force_eos, (R,); None where no row is at its max_len yet, as the search
    knows on the host before the first one is: `_forced`)."""

    step: int
    min_len: int
    force_eos: Tensor | None

    def apply(self, log_probs: Tensor) -> None:
        """Set the forbidden tokens' log-probabilities (R, V) to -inf, in place (logits
        alike: a token forbidden in one is forbidden in the other)."""
        log_probs[:, PAD] = -math.inf
        log_probs[:, BOS] = -math.inf
        if self.step < self.min_len:
            log_probs[:, EOS] = -math.inf
        if self.force_eos is not None and bool(self.force_eos.any()):
            eos = log_probs[:, EOS].clone()
            log_probs[self.force_eos] = -math.inf
            log_probs[self.force_eos, EOS] = eos[self.force_eos]

    def rows(self, start: int, stop: int) -> _StepRules:
        """The rules of rows start:stop."""
        force = None if self.force_eos is None else self.force_eos[start:stop]
        return _StepRules(self.step, self.min_len, force)


def _forced(step: int, max_len: Tensor, first: int) -> Tensor | None:
    """Rows at their maximum length at `step` (max_len (R,)), or None before step `first`, the
    smallest max_len the search began with: no row can be there yet, and the comparison and its
    check (a host sync) are skipped at those steps."""
    return None if step < first else step >= max_len


#: glibc's largest mmap threshold: it maps every allocation this large afresh (`_next_tokens`).
_GLIBC_MMAP_BYTES = 32 * 2**20
#: The most rows a CPU projects and ranks at once (`_next_tokens`).
_CPU_PIECE_ROWS = 256
#: The columns each first-stage maximum of `_top_n` covers.
_TOP_N_CHUNK = 64
#: The fewest rows `_top_1` ranks in two stages.
_TOP_1_STAGED_ROWS = 8


def _next_tokens(
    model: Decoder,
    last: Tensor,
    memory: Memory,
    cache: DecoderCache,
    rules: _StepRules,
    n: int,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """The n most probable next tokens of R rows: log-probabilities and ids, (R, min(n, V));
    without `normalize`, their logits instead (the same ids).

    last: (R, 1) newest tokens. Ranking each row first keeps the beam step small: no sentence
    needs more than 2K of one beam's extensions.

    On a CPU the rows are projected and ranked in pieces of at most 256 rows and under 32 MiB
    of logits. glibc maps every allocation of 32 MiB or more afresh from the kernel and pays a
    page fault per 4 kB page of it; a beam-5 step's logits reach 1,575 x 8,000 floats (50 MB),
    and in pieces under that beam 5 ran about 6% faster. Pieces of 256 rows rather than 1,048
    ran the default recipe's beam-5 decode 1-2% faster again on a 2-core Xeon, most of it in
    the projection (MKL packs its weight for 256 rows: `seq2seq.kernels.mkl`). Accelerators
    take all rows at once.
    """
    states = model.decode(last, memory, cache)[:, -1]  # (R, D)
    piece = states.size(0)
    if states.device.type == "cpu":
        row_bytes = model.tgt_vocab_size * torch.promote_types(states.dtype, torch.float32).itemsize
        piece = max(1, min(_CPU_PIECE_ROWS, (_GLIBC_MMAP_BYTES - 1) // row_bytes))
    if states.size(0) <= piece:
        return _rank(model.project(states), rules, n, normalize)
    ranked = [
        _rank(model.project(states[i : i + piece]), rules.rows(i, i + piece), n, normalize)
        for i in range(0, states.size(0), piece)
    ]
    return torch.cat([top for top, _ in ranked]), torch.cat([token for _, token in ranked])


def _rank(
    logits: Tensor, rules: _StepRules, n: int, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Rows' n best log-probabilities and token ids under `rules`, from logits (R, V) that
    are overwritten; without `normalize`, the n best logits (log_softmax subtracts one number
    per row, so the ids are the same, barring two logits that its rounding makes equal)."""
    # At least float32 (bf16/fp16 models); float64 models keep float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # One fused log_softmax: cheaper on a CPU than logsumexp, whose composite kernels write the
    # (R, V) tensor twice (measured: 19% of a beam-5 decode against log_softmax's 8%). In place:
    # a new (R, V) tensor of 32 MiB or more would pay glibc's page faults again (`_next_tokens`).
    log_probs = torch.log_softmax(logits, dim=-1, out=logits) if normalize else logits
    rules.apply(log_probs)
    if n == 1:
        return _top_1(log_probs)
    return _top_n(log_probs, min(n, log_probs.size(-1)))


def _top_1(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x.max(dim=-1, keepdim=True)` of rows x (R, V), in two stages: the maximum of each
    chunk of `_TOP_N_CHUNK` columns, the first chunk holding the row's maximum, then the first
    column in it that does. Both stages take the first of equal maxima, as max does, so values
    and ids are max's. On a CPU max keeps an index beside every comparison; the chunk maxima
    are plain vector maxima, and the second stage reads 64 columns (greedy search's ranking of
    256 x 8,000 logits took about two thirds of max's time on a 2-core Xeon). Below
    `_TOP_1_STAGED_ROWS` rows the stages' eight operator calls cost more than they save (one
    thread, 8,000 columns: 1 row 4.9 us by max against 18.8 staged, 8 rows 26.7 against 27.3,
    16 rows 52.9 against 38.1), and vocabularies that are not whole chunks take max."""
    R, V = x.shape
    chunk = _TOP_N_CHUNK
    C = V // chunk
    if C < 2 or C * chunk != V or R < _TOP_1_STAGED_ROWS:
        return x.max(dim=-1, keepdim=True)
    best = x.view(R, C, chunk).amax(dim=-1).argmax(dim=-1)  # (R,) the first chunk with the max
    rows = torch.arange(R, device=x.device) * C + best
    at = x.view(R * C, chunk).index_select(0, rows).argmax(dim=-1)  # (R,)
    ids = (best * chunk + at)[:, None]
    return x.gather(1, ids), ids


def _top_n(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """`x.topk(n, dim=-1)` of rows x (R, V), in two stages: the maximum of each chunk of
    `_TOP_N_CHUNK` columns, the n chunks with the largest, then the n best of those chunks'
    columns (and of the last V mod 64, which fill no chunk). A row's n best lie in its n best
    chunks, so the values are topk's, and the ids too but among equal values. On a CPU torch's
    topk of 10 over 8,000 columns took about twice the time of the two stages, which read the
    row once, then n * 64 columns (the default recipe's beam-5 decode 3-5% faster on a 2-core
    Xeon)."""
    R, V = x.shape
    chunk = _TOP_N_CHUNK
    C = V // chunk
    if n >= C:  # too few chunks to pass over
        return x.topk(n, dim=-1)
    head = C * chunk
    chunks = x[:, :head].view(R, C, chunk)
    best = chunks.amax(dim=-1).topk(n, dim=-1).indices  # (R, n) chunk numbers
    if head == V:  # whole chunks copied by one index_select, several times faster than gather
        flat = (torch.arange(R, device=x.device)[:, None] * C + best).view(-1)
        columns = x.view(R * C, chunk).index_select(0, flat).view(R, n * chunk)
    else:
        columns = chunks.gather(1, best[:, :, None].expand(R, n, chunk)).view(R, n * chunk)
        columns = torch.cat([columns, x[:, head:]], dim=1)
    values, at = columns.topk(n, dim=-1)
    ids = best.gather(1, (at // chunk).clamp(max=n - 1)) * chunk + at % chunk
    if head < V:
        ids = torch.where(at >= n * chunk, at - n * chunk + head, ids)
    return values, ids


@dataclass
class _Finished:
    """Hypotheses that ended at one step: sentence ids (n,), tokens (n, t), log-probs (n,)."""

    sentence: Tensor
    tokens: Tensor
    log_prob: Tensor


def _collect(
    finished: list[_Finished], n_sentences: int, nbest: int, alpha: float
) -> list[list[Hypothesis]]:
    """Group finished hypotheses by sentence, apply the length penalty, keep the n best."""
    out: list[list[Hypothesis]] = [[] for _ in range(n_sentences)]
    for chunk in finished:
        penalty = length_penalty(chunk.tokens.size(1) + 1, alpha)
        for s, toks, lp in zip(
            chunk.sentence.tolist(), chunk.tokens.tolist(), chunk.log_prob.tolist(), strict=True
        ):
            out[s].append(Hypothesis(toks, lp / penalty, lp))
    for hyps in out:
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nbest:]
    return out


@torch.inference_mode()
def greedy_search(
    model: Decoder,
    src: Tensor,
    cfg: DecodeConfig,
    max_positions: int | None = None,
    scores: bool = True,
) -> list[list[Hypothesis]]:
    """The most probable next token at every step; arguments as for `search` (one hypothesis;
    without `scores`, its score and log_prob are NaN)."""
    max_len = max_output_lengths(src, cfg, max_positions)  # (B,)
    memory, cache = model.encode(src), model.new_cache(int(max_len.max()) + 1)
    sentence = torch.arange(src.size(0), device=src.device)  # row -> input sentence
    tokens = src.new_full((src.size(0), 1), BOS)  # (R, 1 + step): BOS + output so far
    log_prob = torch.full((src.size(0),), 0.0 if scores else math.nan, device=src.device)
    max_len = max_len.to(src.device)
    first_forced = int(max_len.min())
    finished: list[_Finished] = []
    for step in range(int(max_len.max()) + 1):
        rules = _StepRules(step, cfg.min_len, _forced(step, max_len, first_forced))
        top, token = _next_tokens(model, tokens[:, -1:], memory, cache, rules, 1, scores)
        best = token[:, 0]  # (R,)
        if scores:
            log_prob = log_prob + top[:, 0]
        ended = best == EOS
        if bool(ended.any()):
            finished.append(_Finished(sentence[ended], tokens[ended, 1:], log_prob[ended]))
            keep = _in_place(~ended)
            if keep.numel() == 0:
                break
            sentence, max_len, log_prob = sentence[keep], max_len[keep], log_prob[keep]
            tokens, best = tokens[keep], best[keep]
            memory = memory.select(keep)
            cache.reorder(keep)
        tokens = torch.cat([tokens, best[:, None]], dim=1)
    return _collect(finished, src.size(0), 1, cfg.lenpen)


def _in_place(alive: Tensor) -> Tensor:
    """The indices of alive's True entries (alive (n,) bool), ordered to leave each where it
    is if it can: survivors among the first n' (n' = how many survive) keep their place, and
    those beyond fill the places of the others there (the cache then moves only those)."""
    n = int(alive.sum())
    index = torch.arange(n, device=alive.device)
    index[(~alive[:n]).nonzero().squeeze(1)] = alive[n:].nonzero().squeeze(1) + n
    return index


def _child_slots(parent: Tensor, K: int) -> Tensor:
    """Where each sentence's K new beams go among its K rows: parent (N, K), the row within
    its sentence (< K) of each new beam's parent, best beam first. The best continuation of
    each parent takes its parent's row, so that row's cache stays where it is; the others
    take, in order, the rows that no parent holds. Returns (N, K), a permutation of 0..K-1
    per sentence."""
    same = parent[:, :, None] == parent[:, None, :]  # (N, K, K)
    later = same.tril(-1).any(dim=2)  # the parent has a better continuation
    held = (parent[:, :, None] == torch.arange(K, device=parent.device)).any(dim=1)  # (N, K)
    free = held.to(torch.uint8).argsort(dim=1, stable=True)  # rows no parent holds, first
    nth = (later.long().cumsum(dim=1) - 1).clamp(min=0)
    return torch.where(later, free.gather(1, nth), parent)


@dataclass
class _Beams:
    """The live part of a beam search: N sentences still searching, k beams each (rows N * k).

    Sentence n's k beams hold rows n * k to n * k + k - 1 in any order (a beam stays in its
    parent's row where it can, so that the cache copies less; `_child_slots`); `row` says
    which, and the search ranks the beams best first, as it did when rows came in that order."""

    tokens: Tensor  # (N * k, 1 + step) BOS + tokens so far, per row
    log_prob: Tensor  # (N, k) cumulative log-probability of each beam, best first
    row: Tensor  # (N, k) the row of each beam, best first
    sentence: Tensor  # (N,) input index of each sentence
    max_len: Tensor  # (N,)
    n_finished: Tensor  # (N,) hypotheses finished so far
    kept: Tensor  # (N, nbest) float64: the best finished scores so far, best first (-inf: none)


@dataclass
class _Candidates:
    """The best 2K extensions of every sentence's beams, best first: each (N, 2K)."""

    log_prob: Tensor
    beam: Tensor
    token: Tensor


def _top_candidates(top: Tensor, token: Tensor, beams: _Beams, K: int) -> _Candidates:
    """Each sentence's best 2K extensions out of its k beams' own best n, in one topk.

    top, token: (N * k, n) each beam's n best next tokens (n = 2K suffices: no beam can
    contribute more than 2K of the sentence's best 2K).
    """
    N, k = beams.log_prob.shape
    n = top.size(1)
    at = beams.row.view(-1)  # the beams' rows, best first
    top, token = top.index_select(0, at), token.index_select(0, at)
    total = (beams.log_prob[:, :, None] + top.view(N, k, n)).view(N, k * n)
    n_cand = min(2 * K, k * n)
    log_prob, flat = total.topk(n_cand, dim=1)  # (N, n_cand), best first
    cand_token = token.view(N, k * n).gather(1, flat)
    if n_cand < 2 * K:  # a tiny vocabulary: pad with dead candidates so K non-EOS exist
        pad = 2 * K - n_cand
        log_prob = F.pad(log_prob, (0, pad), value=-math.inf)
        flat = F.pad(flat, (0, pad), value=0)  # beam 0 ...
        cand_token = F.pad(cand_token, (0, pad), value=PAD)  # ... token PAD: never finishes
    return _Candidates(log_prob, torch.div(flat, n, rounding_mode="floor"), cand_token)


def _finish(cand: _Candidates, beams: _Beams, K: int, penalty: float) -> _Finished | None:
    """EOS candidates among each sentence's best K become finished hypotheses (fairseq's rule).

    Also counts them in `beams.n_finished` and merges their scores (log-probability over
    `penalty`, this step's length penalty, in float64 as `_collect` scores them) into
    `beams.kept`.
    """
    ended = (cand.token[:, :K] == EOS) & torch.isfinite(cand.log_prob[:, :K])  # (N, K)
    if not bool(ended.any()):
        return None
    beams.n_finished += ended.sum(dim=1)
    scores = (cand.log_prob[:, :K].double() / penalty).masked_fill(~ended, -math.inf)
    nbest = beams.kept.size(1)
    beams.kept = torch.cat([beams.kept, scores], dim=1).topk(nbest, dim=1).values
    n, j = ended.nonzero(as_tuple=True)
    rows = beams.row[n, cand.beam[n, j]]
    return _Finished(beams.sentence[n], beams.tokens[rows, 1:], cand.log_prob[n, j])


def _advance(
    cand: _Candidates, beams: _Beams, cfg: DecodeConfig, step: int, penalties: Tensor
) -> tuple[_Beams, Tensor, Tensor]:
    """Next beams: each sentence's best K non-EOS candidates; sentences that are done leave.
    `penalties[n]` is the length penalty of length n (`_best_reachable`).

    Returns the new beams, the cache rows to keep (N' * K,: new row -> old row) and the
    sentences kept (N',). Both leave as many rows where they were as they can (`_in_place`,
    `_child_slots`)."""
    k = beams.log_prob.size(1)
    K = cfg.beam
    rank = torch.arange(2 * K, device=cand.token.device)
    order = (cand.token == EOS).long() * (2 * K) + rank  # non-EOS first, best first
    pick = order.topk(K, dim=1, largest=False).indices  # (N, K)
    parent = beams.row.gather(1, cand.beam.gather(1, pick))  # (N, K) rows of their parents
    log_prob = cand.log_prob.gather(1, pick)  # (N, K): the live beams, best first
    done = step >= beams.max_len
    if cfg.stop == "best":  # however many others have ended, as CTranslate2 does
        done |= (cand.token[:, 0] == EOS) & (beams.n_finished >= cfg.nbest)
    else:
        done |= beams.n_finished >= K
    # Under either rule, nothing a live beam could still add would enter the n-best.
    done |= beams.kept[:, -1] >= _best_reachable(log_prob[:, 0], beams.max_len, penalties, step)
    keep = _in_place(~done)  # (N',)
    parent = parent[keep]
    slot = _child_slots(parent - keep[:, None] * k, K)  # (N', K)
    row = torch.arange(keep.numel(), device=slot.device)[:, None] * K + slot
    rows = torch.empty_like(parent).scatter_(1, slot, parent).view(-1)  # row -> parent's
    token = torch.empty_like(parent).scatter_(1, slot, cand.token.gather(1, pick)[keep])
    new = _Beams(
        torch.cat([beams.tokens[rows], token.view(-1, 1)], dim=1),
        log_prob[keep],
        row,
        beams.sentence[keep],
        beams.max_len[keep],
        beams.n_finished[keep],
        beams.kept[keep],
    )
    return new, rows, keep


def _best_reachable(log_prob: Tensor, max_len: Tensor, penalties: Tensor, step: int) -> Tensor:
    """The highest score any continuation of beams with log-probabilities `log_prob` (N,),
    alive after `step`, could reach, in float64: at most that log-probability (it is <= 0 and
    only falls), over the largest length penalty of a length it can still end at (from
    step + 2 to its limit `max_len` (N,) + 1, EOS included). `penalties[n]` is
    `length_penalty(n)`, the very value `_collect` divides by, and IEEE division keeps the
    order, so no score `_collect` computes exceeds the bound."""
    shortest = penalties[min(step + 2, penalties.numel() - 1)]
    largest = torch.maximum(penalties[max_len + 1], shortest)  # increasing, or not (alpha < 0)
    return log_prob.double() / largest


@torch.inference_mode()
def beam_search(
    model: Decoder, src: Tensor, cfg: DecodeConfig, max_positions: int | None = None
) -> list[list[Hypothesis]]:
    """Beam search with cfg.beam beams; arguments as for `search`.

    The first step runs on one row per sentence; then each sentence has K rows (sentence-major)
    that share its memory and cross-attention K/V (computed once, never copied per beam).
    """
    B, K = src.size(0), cfg.beam
    beams = _Beams(
        tokens=src.new_full((B, 1), BOS),
        log_prob=torch.zeros(B, 1, device=src.device),
        row=torch.arange(B, device=src.device)[:, None],
        sentence=torch.arange(B, device=src.device),
        max_len=max_output_lengths(src, cfg, max_positions).to(src.device),
        n_finished=torch.zeros(B, dtype=torch.long, device=src.device),
        kept=torch.full((B, cfg.nbest), -math.inf, dtype=torch.float64, device=src.device),
    )
    longest = int(beams.max_len.max()) + 1  # tokens + EOS
    first_forced = int(beams.max_len.min())
    memory, cache = model.encode(src), model.new_cache(longest)
    by_length = [length_penalty(n, cfg.lenpen) for n in range(longest + 1)]
    penalties = torch.tensor(by_length, dtype=torch.float64, device=src.device)
    finished: list[_Finished] = []
    for step in range(longest):
        k = beams.log_prob.size(1)
        forced = _forced(step, beams.max_len, first_forced)
        forced = None if forced is None else forced.repeat_interleave(k)
        rules = _StepRules(step, cfg.min_len, forced)
        top, token = _next_tokens(model, beams.tokens[:, -1:], memory, cache, rules, 2 * K)
        cand = _top_candidates(top, token, beams, K)
        ended = _finish(cand, beams, K, by_length[step + 1])
        if ended is not None:
            finished.append(ended)
        new, rows, keep = _advance(cand, beams, cfg, step, penalties)
        if keep.numel() == 0:
            break
        dropped = keep.numel() < beams.sentence.numel()
        if dropped:  # memory and cross-attention K/V are per sentence, shared by its beams
            memory = memory.select(keep)
        cache.reorder_beams(rows, keep if dropped else None)
        beams = new
    return _collect(finished, B, cfg.nbest, cfg.lenpen)
