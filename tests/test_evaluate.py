"""`seq2seq evaluate` and `score()`: sacreBLEU's numbers and signatures, line-count checks."""

import gzip
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from conftest import SLICE, read_gz_lines

from seq2seq.cli import main
from seq2seq.inference.evaluate import (
    LineCountError,
    corpus_scores,
    evaluate_files,
    moses_tokenized,
    score,
)


@pytest.fixture(scope="module")
def refs() -> list[str]:
    return read_gz_lines(SLICE / "test_2016_flickr.de.gz", 200)


def degrade(lines: list[str]) -> list[str]:
    """A plausible system output: every third line loses its last word, some are swapped."""
    out = [" ".join(s.split()[:-1]) if i % 3 == 0 else s for i, s in enumerate(lines)]
    out[5], out[6] = out[6], out[5]
    return out


@pytest.fixture
def files(tmp_path, refs) -> tuple[Path, Path]:
    hyp, ref = tmp_path / "hyp.de", tmp_path / "ref.de.gz"
    hyp.write_text("\n".join(degrade(refs)) + "\n", encoding="utf-8")
    with gzip.open(ref, "wt", encoding="utf-8") as f:
        f.write("\n".join(refs) + "\n")
    return hyp, ref


def test_score_equals_the_sacrebleu_python_api(refs):
    hyps = degrade(refs)
    got = score(hyps, refs, ["bleu", "chrf", "ter"])
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert got["ter"] == sacrebleu.corpus_ter(hyps, [refs]).score
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert 0 < got["bleu"] < 100


def test_files_score_equals_the_sacrebleu_command(files):
    hyp, ref = files
    plain_ref = ref.with_suffix("")  # the sacrebleu command reads the same text ungzipped
    with gzip.open(ref, "rb") as f:
        plain_ref.write_bytes(f.read())
    command = [sys.executable, "-m", "sacrebleu", str(plain_ref), "-i", str(hyp)]
    command += ["-m", "bleu", "chrf", "ter", "-f", "json", "-w", "6"]
    theirs = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    ours = evaluate_files(hyp, ref, ["bleu", "chrf", "ter"])
    for (result, signature), expected in zip(ours.values(), theirs, strict=True):
        assert round(result.score, 6) == pytest.approx(expected["score"], abs=1e-6)
        assert signature == expected["signature"]


def test_cli_prints_each_score_with_its_signature(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--metrics", "bleu", "ter"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert lines[1].startswith("TER|nrefs:1|case:lc|tok:tercom")


def test_cli_json_has_scores_and_signatures(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"bleu", "bleu_signature", "chrf", "chrf_signature"}
    assert report["bleu"] == score(*map(_lines, files))["bleu"]


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def test_line_count_mismatch_is_one_error_naming_both_files_and_counts(files, capsys):
    hyp, ref = files
    hyp.write_text("only one line\n", encoding="utf-8")
    with pytest.raises(LineCountError, match=r"hyp\.de has 1 lines but .*ref\.de\.gz has 200"):
        evaluate_files(hyp, ref, ["bleu"])
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("seq2seq evaluate: error:") and "200" in err and "\n" not in err


def test_hyp_and_model_are_mutually_exclusive(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--ref", str(ref)]) == 1
    assert "give either --hyp" in capsys.readouterr().err


def test_device_with_hyp_files_is_refused_rather_than_ignored(files, capsys):
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "seq2seq evaluate: error: --device is where -m translates --src: --hyp files need none"
    )


#: Raw Multi30k test_2016_flickr German lines 1, 2, 226 and 230, and the same lines in the
#: Multi30k repository's data/task1/tok/test_2016_flickr.lc.norm.tok.de (Moses' lowercase.perl,
#: normalize-punctuation.perl -l de, tokenizer.perl -l de): the text the papers' BLEU scores.
MULTI30K_RAW = [
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Ein Boston Terrier läuft über saftig-grünes Gras vor einem weißen Zaun.",
    'Eine Frau auf einem Boot namens "El Corazon" lässt schwarze Gewichte ins Wasser fallen.',
    'Ein Jugendlicher in einem schwarzen T-Shirt mit dem Aufdruck "Asian Pacific 2007" sitzt '
    "und spielt eine Trommel.",
]
MULTI30K_TOK = [
    "ein mann mit einem orangefarbenen hut , der etwas anstarrt .",
    "ein boston terrier läuft über saftig-grünes gras vor einem weißen zaun .",
    "eine frau auf einem boot namens &quot; el corazon &quot; lässt schwarze gewichte ins "
    "wasser fallen .",
    "ein jugendlicher in einem schwarzen t-shirt mit dem aufdruck &quot; asian pacific 2007 "
    "&quot; sitzt und spielt eine trommel .",
]


def test_moses_tokenization_reproduces_the_multi30k_tok_files():
    pytest.importorskip("sacremoses")
    assert moses_tokenized(MULTI30K_RAW, "de", lowercase=True) == MULTI30K_TOK
    cased = moses_tokenized(MULTI30K_RAW[:1], "de")
    assert cased == ["Ein Mann mit einem orangefarbenen Hut , der etwas anstarrt ."]


def test_moses_with_a_language_it_has_no_abbreviations_for_says_it_falls_back_to_english(
    caplog,
):
    """`--moses DE` (or a language without a prefix file) tokenizes "bzw." as English does,
    splitting off its period, as tokenizer.perl does after its warning: the user is told."""
    pytest.importorskip("sacremoses")
    line = ["Hunde bzw. Katzen spielen."]
    with caplog.at_level("WARNING", logger="seq2seq"):
        assert moses_tokenized(line, "de") == ["Hunde bzw. Katzen spielen ."]
    assert not caplog.records
    with caplog.at_level("WARNING", logger="seq2seq"):
        assert moses_tokenized(line, "DE") == ["Hunde bzw . Katzen spielen ."]
    assert "'DE'" in caplog.text and "English" in caplog.text and " de," in caplog.text


def test_moses_tokenized_test_2016_flickr_has_the_published_baselines_reference_length(
    multi30k_dir,
):
    """Wu et al.'s fairseq log reads `reflen=12103`: the words of Multi30k's tokenized file."""
    pytest.importorskip("sacremoses")
    refs = read_gz_lines(multi30k_dir / "test_2016_flickr.de.gz")
    bleu = corpus_scores(refs, refs, ["bleu"], lowercase=True, moses="de")["bleu"][0]
    assert (bleu.ref_len, len(refs)) == (12103, 1000)


def test_moses_bleu_is_sacrebleu_untokenized_on_moses_tokenized_text(refs):
    pytest.importorskip("sacremoses")
    hyps = degrade(refs)
    ((result, signature),) = corpus_scores(
        hyps, refs, ["bleu"], lowercase=True, moses="de"
    ).values()
    tok_hyps = moses_tokenized(hyps, "de", lowercase=True)
    tok_refs = moses_tokenized(refs, "de", lowercase=True)
    expected = sacrebleu.corpus_bleu(tok_hyps, [tok_refs], tokenize="none", lowercase=True)
    assert result.score == expected.score
    assert "|case:lc|" in signature and "|tok:none|" in signature
    assert signature.endswith("|moses:de|sacremoses:" + importlib.metadata.version("sacremoses"))


def test_moses_normalizes_punctuation_that_13a_scores_as_a_mismatch():
    pytest.importorskip("sacremoses")
    refs = [MULTI30K_RAW[2]]
    hyps = [refs[0].replace('"El Corazon"', "„El Corazon“")]  # German quotation marks
    assert corpus_scores(hyps, refs, ["bleu"], moses="de")["bleu"][0].score == pytest.approx(100.0)
    assert corpus_scores(hyps, refs, ["bleu"])["bleu"][0].score < 80


def test_cli_moses_prints_the_tokenized_score_with_its_preprocessing(files, capsys):
    pytest.importorskip("sacremoses")
    hyp, ref = files
    args = ["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--metrics", "bleu"]
    assert main([*args, "--moses", "de", "--lowercase", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = corpus_scores(*map(_lines, files), ["bleu"], lowercase=True, moses="de")
    assert report["bleu"] == expected["bleu"][0].score
    assert "tok:none" in report["bleu_signature"] and "moses:de" in report["bleu_signature"]


def test_moses_without_sacremoses_is_one_line_naming_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sacremoses", None)  # import sacremoses now fails
    hyp, ref = files
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--moses", "de"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "seq2seq evaluate: error: Moses tokenization needs sacremoses, which is not installed: "
        "pip install -e .[papers]"
    )
