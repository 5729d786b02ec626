"""`seq2seq evaluate` and `score()`: sacreBLEU's numbers and signatures, line-count checks."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from conftest import SLICE, read_gz_lines

from seq2seq.cli import main
from seq2seq.inference.evaluate import LineCountError, evaluate_files, score


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
