"""`seq2seq evaluate --hyp A B ... --ref R --paired-bs / --paired-ar`: sacreBLEU's paired
significance tests, every system against the first."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SLICE, read_gz_lines

from seq2seq.cli import main


def degrade(refs: list[str], every: int) -> list[str]:
    """Drop the last word of every `every`-th line: a system that is worse the smaller `every`."""
    return [" ".join(r.split()[:-1]) if i % every == 0 else r for i, r in enumerate(refs)]


@pytest.fixture(scope="module")
def systems(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("systems")
    refs = read_gz_lines(SLICE / "val.de.gz", 100)
    ref = out / "ref.de"
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    hyps = []
    for name, every in (("baseline.de", 2), ("better.de", 5), ("best.de", 50)):
        hyps.append(out / name)
        hyps[-1].write_text("\n".join(degrade(refs, every)) + "\n", encoding="utf-8")
    return ref, hyps


def evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sacrebleu_table(ref: Path, hyps: list[Path], *options: str) -> list[dict]:
    """The `sacrebleu` command's paired-test table, per system: per metric (BLEU, chrF2) its
    score, mean and CI (None where not printed) and p-value (None for the baseline). (Its JSON
    output fails on numpy's float32 in this sacreBLEU, so the text table is read.)"""
    command = [sys.executable, "-m", "sacrebleu", str(ref), "-i", *map(str, hyps)]
    command += ["-m", "bleu", "chrf", "-f", "text", "-nc", "-w", "4", *options]
    out = subprocess.run(command, capture_output=True, check=True, text=True).stdout
    table = [line for line in out.splitlines() if line.startswith("│")]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table]  # rows[0]: the header
    systems: list[dict] = []
    for cells in rows[1:]:
        if cells[0]:
            systems.append({m: _cell(c) for m, c in zip(("BLEU", "chrF2"), cells[1:], strict=True)})
        else:  # the row under a system's scores holds its p-values
            for metric, cell in zip(("BLEU", "chrF2"), cells[1:], strict=True):
                systems[-1][metric]["p_value"] = float(re.search(r"p = ([\d.]+)", cell)[1])
    return systems


def _cell(text: str) -> dict:
    found = re.fullmatch(r"([\d.]+)(?: \(([\d.]+) ± ([\d.]+)\))?", text)
    score, mean, ci = (None if x is None else float(x) for x in found.groups())
    return {"score": score, "mean": mean, "ci": ci, "p_value": None}


@pytest.mark.parametrize(
    ("flag", "theirs", "n"),
    [("--paired-bs", "--paired-bs-n", "200"), ("--paired-ar", "--paired-ar-n", "300")],
)
def test_the_paired_tests_give_the_sacrebleu_commands_scores_and_p_values(
    systems, capsys, flag, theirs, n
):
    ref, hyps = systems
    args = ["--hyp", *map(str, hyps), "--ref", str(ref), flag, "--paired-n", n, "--json"]
    code, out, _ = evaluate(capsys, *args)
    assert code == 0
    ours = json.loads(out)
    expected = sacrebleu_table(ref, hyps, flag, theirs, n)
    assert ours["n"] == int(n) and [s["system"] for s in ours["systems"]] == list(map(str, hyps))
    for system, reference in zip(ours["systems"], expected, strict=True):
        for metric in ("BLEU", "chrF2"):
            for key in ("score", "mean", "ci", "p_value"):
                if reference[metric][key] is not None:  # AR's table has no mean or CI
                    assert system[metric][key] == pytest.approx(reference[metric][key], abs=1e-4)
            assert system[metric]["ci"] > 0  # approximate randomization reports one too
    assert ours["systems"][0]["BLEU"]["p_value"] is None  # the baseline
    assert ours["systems"][2]["BLEU"]["p_value"] < 0.05  # best.de differs from the baseline
    assert ours["signatures"]["BLEU"].startswith("nrefs:1|")
    # The resamples given, as the sacrebleu command signs them (not always bs:1000).
    assert f"|{flag.removeprefix('--paired-')}:{n}|" in ours["signatures"]["BLEU"]


def test_the_text_report_gives_each_systems_score_interval_and_p_value(systems, capsys):
    ref, hyps = systems
    args = ["--hyp", *map(str, hyps), "--ref", str(ref), "--paired-bs", "--paired-n", "100"]
    code, out, _ = evaluate(capsys, *args)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("paired bootstrap resampling, n = 100")
    bleu = [line for line in lines if "baseline.de" in line or "better.de" in line]
    assert "baseline" in bleu[0].split()[-1] and "±" in bleu[0]
    assert "p = " in bleu[1]
    assert sum("best.de" in line for line in lines) == 2  # one line per metric (BLEU, chrF2)


def test_a_hypothesis_file_of_another_length_is_one_line_naming_it_and_both_counts(
    systems, tmp_path, capsys
):
    ref, hyps = systems
    short = tmp_path / "short.de"
    short.write_text("ein Hund\n", encoding="utf-8")
    code, out, err = evaluate(
        capsys, "--hyp", str(hyps[0]), str(short), "--ref", str(ref), "--paired-bs"
    )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "short.de has 1 lines" in err and "has 100" in err


def test_a_paired_test_needs_two_systems_and_several_systems_need_a_test(systems, capsys):
    ref, hyps = systems
    code, _, err = evaluate(capsys, "--hyp", str(hyps[0]), "--ref", str(ref), "--paired-ar")
    assert code == 1 and "two --hyp files or more" in err
    code, _, err = evaluate(capsys, "--hyp", *map(str, hyps[:2]), "--ref", str(ref))
    assert code == 1 and "--paired-bs or --paired-ar" in err
