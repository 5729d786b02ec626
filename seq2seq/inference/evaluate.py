"""`seq2seq evaluate`: BLEU, chrF and TER by sacreBLEU, each with its signature, and
sacreBLEU's paired significance tests between systems.

Scores are sacreBLEU's defaults on detokenized text against raw references, so they equal
`sacrebleu REF -i HYP -m bleu chrf ter` on the same files. Files are read as sacreBLEU's
command reads them: UTF-8, split on "\\n", trailing whitespace stripped; .gz is decompressed.

Papers that report "tokenized BLEU" (fairseq-generate's, or multi-bleu.perl's) score text that
Moses' scripts tokenized; `moses` reproduces that text with sacremoses and scores it with
sacreBLEU's `tok:none`, so such numbers can be compared with ours on one system's output.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric, Score

METRICS: dict[str, type[Metric]] = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


class LineCountError(ValueError):
    """Hypotheses and references are not line-aligned."""


def read_text(path: str | Path) -> list[str]:
    """Lines of a plain or .gz UTF-8 file, split on "\\n", trailing whitespace stripped.

    Raises:
        ValueError: invalid UTF-8 (naming the file and the 1-based line), or a .gz file
            that is not gzip; FileNotFoundError naming the file.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    lines.append(raw.decode("utf-8").rstrip())
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{path}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start})"
                    ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    return lines


def check_aligned(a: Sequence[str], a_name: str, b: Sequence[str], b_name: str) -> None:
    if len(a) != len(b):
        raise LineCountError(
            f"{a_name} has {len(a)} lines but {b_name} has {len(b)}; they must be line-aligned"
        )


log = logging.getLogger(__name__)

#: How to install what `moses_tokenized` needs.
MOSES_EXTRA = "pip install -e .[papers]"


def moses_tokenized(lines: Sequence[str], lang: str, lowercase: bool = False) -> list[str]:
    """Lines as Moses' `lowercase.perl` (with `lowercase`), `normalize-punctuation.perl -l LANG`
    and `tokenizer.perl -l LANG` (escaping on, no `-a`) write them, through sacremoses: the text
    that papers' tokenized BLEU is computed on, such as Multi30k's `data/task1/tok/*.lc.norm.tok.*`.

    Raises:
        RuntimeError: sacremoses is not installed (naming the extra that installs it).
    """
    try:
        from sacremoses import MosesPunctNormalizer, MosesTokenizer
    except ImportError:
        raise RuntimeError(
            f"Moses tokenization needs sacremoses, which is not installed: {MOSES_EXTRA}"
        ) from None
    _warn_if_unknown(lang)
    normalizer, tokenizer = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    out = []
    for line in lines:
        text = normalizer.normalize(line.lower() if lowercase else line)
        out.append(tokenizer.tokenize(text, escape=True, return_str=True))
    return out


@functools.cache
def _warn_if_unknown(lang: str) -> None:
    """Warn, once per language, where Moses has no abbreviations (nonbreaking prefixes) for
    `lang` ('DE', 'xx'): tokenizer.perl warns and tokenizes with English's, as sacremoses does
    silently."""
    from sacremoses.corpus import NonbreakingPrefixes

    known = NonbreakingPrefixes().available_langs
    if lang not in known:
        log.warning(
            "Moses has no abbreviations for language %r: tokenizing with English's, as "
            "tokenizer.perl does (codes it knows: %s)",
            lang,
            ", ".join(sorted(set(known.values()))),
        )


def moses_label(lang: str) -> str:
    """The preprocessing a `moses` score ran, to print beside sacreBLEU's signature."""
    from importlib.metadata import version

    return f"moses:{lang}|sacremoses:{version('sacremoses')}"


def corpus_scores(
    hyps: Sequence[str],
    refs: Sequence[str],
    metrics: Sequence[str],
    lowercase: bool = False,
    moses: str | None = None,
) -> dict[str, tuple[Score, str]]:
    """sacreBLEU's Score object and signature per metric name (bleu, chrf, ter); with
    `lowercase`, sacreBLEU's case-insensitive variants (signature case:lc), as papers that
    report lowercased BLEU score. With `moses` (a language code), both sides are first
    tokenized as `moses_tokenized` does and scored untokenized by sacreBLEU (tok:none); the
    signature then ends in `moses_label`."""
    check_aligned(hyps, "the hypotheses", refs, "the references")
    if not refs:
        raise ValueError("nothing to score: the hypotheses and the references are empty")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}"
        )
    suffix = ""
    if moses is not None:
        hyps, refs = (
            moses_tokenized(hyps, moses, lowercase),
            moses_tokenized(refs, moses, lowercase),
        )
        suffix = f"|{moses_label(moses)}"
    out = {}
    for name in metrics:
        metric = _metric(name, lowercase, pretokenized=moses is not None)
        result = metric.corpus_score(list(hyps), [list(refs)])
        out[name] = (result, str(metric.get_signature()) + suffix)
    return out


def _metric(name: str, lowercase: bool, pretokenized: bool = False) -> Metric:
    if name == "ter":
        return TER(case_sensitive=False) if lowercase else TER()
    if name == "bleu" and pretokenized:
        return BLEU(lowercase=lowercase, tokenize="none", force=True)  # tokenized on purpose
    return METRICS[name](lowercase=True) if lowercase else METRICS[name]()


def score(
    hyps: Sequence[str], refs: Sequence[str], metrics: Sequence[str] = ("bleu", "chrf")
) -> dict[str, float | str]:
    """Corpus scores of detokenized hypotheses against one reference each, with lowercased
    BLEU beside the cased one (papers on Multi30k report lowercased BLEU).

    Returns:
        {"bleu": 35.1, "bleu_signature": "nrefs:1|case:mixed|...", "chrf": ..., ...,
         "bleu_lc": 35.6, "bleu_lc_signature": "nrefs:1|case:lc|..."}
    """
    out = as_dict(corpus_scores(hyps, refs, metrics))
    if "bleu" in metrics:
        lowered = as_dict(corpus_scores(hyps, refs, ["bleu"], lowercase=True))
        out["bleu_lc"], out["bleu_lc_signature"] = lowered["bleu"], lowered["bleu_signature"]
    return out


def as_dict(results: dict[str, tuple[Score, str]]) -> dict[str, float | str]:
    """{"bleu": score, "bleu_signature": signature, ...} out of `corpus_scores`."""
    out: dict[str, float | str] = {}
    for name, (result, signature) in results.items():
        out[name] = result.score
        out[f"{name}_signature"] = signature
    return out


def evaluate_files(
    hyp: str | Path,
    ref: str | Path,
    metrics: Sequence[str],
    lowercase: bool = False,
    moses: str | None = None,
) -> dict[str, tuple[Score, str]]:
    """Score a hypothesis file against a reference file; mismatched line counts name both."""
    hyps, refs = read_text(hyp), read_text(ref)
    check_aligned(hyps, str(hyp), refs, str(ref))
    if not refs:
        raise ValueError(f"{hyp} and {ref} are empty: nothing to score")
    return corpus_scores(hyps, refs, metrics, lowercase, moses)


def translate_and_score(
    model_path: str | list[str],
    src: str,
    ref: str,
    metrics: Sequence[str],
    device: str = "auto",
    lowercase: bool = False,
    moses: str | None = None,
) -> dict[str, tuple[Score, str]]:
    """Translate `src` with the model's saved decoding defaults (a list of models: an
    ensemble), then score against `ref`."""
    from seq2seq.inference.translator import Translator

    sources, refs = read_text(src), read_text(ref)
    check_aligned(sources, src, refs, ref)
    translator = Translator.load(model_path, device, "fp32")
    hyps = translator.translate_texts(sources, name=src)  # warnings name --src
    return corpus_scores(hyps, refs, metrics, lowercase, moses)


#: sacreBLEU's names of its paired tests.
PAIRED_TESTS = {"bs": "paired bootstrap resampling", "ar": "paired approximate randomization"}


def paired_significance(
    hyp_paths: Sequence[str],
    ref: str,
    metrics: Sequence[str],
    test: str,
    n_samples: int | None = None,
    lowercase: bool = False,
    moses: str | None = None,
) -> dict:
    """sacreBLEU's paired significance test (`sacrebleu REF -i A B ... --paired-bs` or
    `--paired-ar`) of every system against the first, the baseline.

    Both tests report each system's score, the bootstrap estimate of its mean and the
    half-width of its 95% confidence interval (approximate randomization estimates them with
    1,000 bootstrap resamples, sacreBLEU's default), and every other system's p-value. The
    seed is sacreBLEU's (12345, or $SACREBLEU_SEED), so the figures repeat.

    Args:
        test: "bs" (n_samples default 1000) or "ar" (default 10000 trials).

    Returns:
        {"test": ..., "n": ..., "signatures": {metric: signature},
         "systems": [{"system": path, metric: {"score", "mean", "ci", "p_value"}, ...}, ...]}
    """
    from sacrebleu.significance import PairedTest

    if len(hyp_paths) < 2:
        raise ValueError(
            f"a {PAIRED_TESTS[test]} test compares systems: give two --hyp files or more, "
            "the baseline first"
        )
    refs = read_text(ref)
    if not refs:
        raise ValueError(f"{ref} is empty: nothing to score")
    systems = []
    for path in hyp_paths:
        hyps = read_text(path)
        check_aligned(hyps, str(path), refs, str(ref))
        systems.append(
            (str(path), hyps if moses is None else moses_tokenized(hyps, moses, lowercase))
        )
    if moses is not None:
        refs = moses_tokenized(refs, moses, lowercase)
    chosen = {name: _metric(name, lowercase, moses is not None) for name in metrics}
    # Approximate randomization gets bootstrap intervals too (0: sacreBLEU's 1,000 resamples);
    # for the bootstrap test they come from its own resamples, and any other value would put
    # bs:1000 in the signatures whatever --paired-n was.
    paired = PairedTest(
        systems,
        chosen,
        [refs],
        test_type=test,
        n_samples=n_samples or 0,
        n_ar_confidence=0 if test == "ar" else -1,
    )
    signatures, results = paired()
    names = results.pop("System")
    return {
        "test": test,
        "n": paired.n_samples,
        "signatures": {
            metric: str(sig) + ("" if moses is None else f"|{moses_label(moses)}")
            for metric, sig in signatures.items()
        },
        "systems": [
            {"system": name, **{m: _plain(r[i]) for m, r in results.items()}}
            for i, name in enumerate(names)
        ],
    }


def _plain(result) -> dict[str, float | None]:
    """A sacrebleu.significance.Result as JSON-ready floats (its numbers may be numpy's)."""
    fields = ("score", "mean", "ci", "p_value")
    return {k: None if getattr(result, k) is None else float(getattr(result, k)) for k in fields}


def format_significance(result: dict) -> str:
    """Per metric, one line per system: score, (mean ± 95% CI), and p against the baseline."""
    lines = [f"{PAIRED_TESTS[result['test']]}, n = {result['n']}; p-values against the baseline"]
    width = max(len(s["system"]) for s in result["systems"])
    for metric, signature in result["signatures"].items():
        lines.append(f"{metric} (mean ± 95% CI)  {signature}")
        for system in result["systems"]:
            r = system[metric]
            p = "baseline" if r["p_value"] is None else f"p = {r['p_value']:.4f}"
            star = "*" if r["p_value"] is not None and r["p_value"] < 0.05 else ""
            lines.append(
                f"  {system['system']:<{width}}  {r['score']:6.2f} "
                f"({r['mean']:.2f} ± {r['ci']:.2f})  {p}{star}"
            )
    return "\n".join(lines)


def evaluate_cli(args: argparse.Namespace) -> int:
    """The `seq2seq evaluate` command (arguments: seq2seq.cli.decode.add_evaluate)."""
    if (args.hyp is None) == (args.model is None) or (args.model is None) != (args.src is None):
        raise ValueError("give either --hyp, or -m/--model with --src")
    if args.device is not None and args.model is None:
        raise ValueError("--device is where -m translates --src: --hyp files need none")
    test = "bs" if args.paired_bs else "ar" if args.paired_ar else None
    if test is not None:
        if args.hyp is None:
            raise ValueError(
                "--paired-bs and --paired-ar compare --hyp files (the first is the baseline)"
            )
        result = paired_significance(
            args.hyp, args.ref, args.metrics, test, args.paired_n, args.lowercase, args.moses
        )
        print(json.dumps(result, indent=2) if args.json else format_significance(result))
        return 0
    if args.paired_n is not None:
        raise ValueError("--paired-n goes with --paired-bs or --paired-ar")
    if args.hyp is not None and len(args.hyp) > 1:
        raise ValueError("several --hyp files are compared with --paired-bs or --paired-ar")
    if args.hyp is not None:
        results = evaluate_files(args.hyp[0], args.ref, args.metrics, args.lowercase, args.moses)
    else:
        results = translate_and_score(
            args.model,
            args.src,
            args.ref,
            args.metrics,
            args.device or "auto",
            args.lowercase,
            args.moses,
        )
    if args.json:
        print(json.dumps(as_dict(results), indent=2))
    else:
        for result, signature in results.values():
            print(result.format(signature=signature))
    return 0
