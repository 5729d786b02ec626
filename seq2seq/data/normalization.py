"""SentencePiece normalization rules that also lowercase (`data.tokenizer.lowercase`).

Multi30k's tokenized release, and the published baselines trained on it, lowercase the text
first (Moses' `lowercase.perl`). SentencePiece's own case-folding rules (`nmt_nfkc_cf`) fold
rather than lowercase: "weiße" becomes "weisse", which a lowercased German reference does not
contain. These rules are a SentencePiece rule (`nmt_nfkc`, `nfkc` or `identity`) followed by
Python's `str.lower()` (what `lowercase.perl` does: ß stays ß), written as SentencePiece's
rule TSV. Compiled into the trained model, they travel inside `spm.model`, checkpoints and
exports, so whatever tokenizes with the model lowercases its input the same way.

The rules map one code point, or one canonical or compatibility decomposition, at a time;
the one context-dependent lowercasing (a word-final Greek capital sigma, which `str.lower()`
makes 'ς') becomes 'σ'.
"""

from __future__ import annotations

import unicodedata
from functools import cache

import sentencepiece as spm


@cache
def lowercasing_rules(base: str) -> str:
    """SentencePiece's rule TSV for `base` (a built-in rule name) followed by lowercasing:
    one line per source that changes, `source code points<TAB>target code points` in hex."""
    builtin = spm.SentencePieceNormalizer(
        rule_name=base,
        add_dummy_prefix=False,
        escape_whitespaces=False,
        remove_extra_whitespaces=False,
    )
    singles = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    sequences = sorted(
        {
            decomposed
            for ch in singles
            for form in ("NFD", "NFKD")
            if len(decomposed := unicodedata.normalize(form, ch)) > 1
        }
    )
    sources = singles + sequences
    targets = [out.lower() for out in builtin.normalize(sources)]
    return "".join(
        f"{_hex(s)}\t{_hex(t)}\n" for s, t in zip(sources, targets, strict=True) if s != t
    )


def _hex(text: str) -> str:
    return " ".join(f"{ord(ch):X}" for ch in text)
