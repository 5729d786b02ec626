"""The README's quickstart, run as written on a Multi30k slice, so the README cannot drift.

Every fenced block right after a `<!-- quickstart -->` comment in README.md is read line by
line; each `seq2seq ...` command runs through `seq2seq.cli.main` in a scratch folder. Only the
training is shrunk (tiny model, a few updates, the slice as `--data.root`); translate and
evaluate run exactly as written, on files made here under the names the README gives. Then
the Python block after `<!-- python-api -->` runs on the model the quickstart trained, and
the recipe data section after `<!-- own-data -->` is prepared on files made under its names.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from seq2seq.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- quickstart -->"
API_MARKER = "<!-- python-api -->"
OWN_DATA_MARKER = "<!-- own-data -->"
#: sacreBLEU's formatted score: "BLEU|nrefs:1|case:mixed|...|version:2.6.0 = 12.34 ..."
BLEU_LINE = re.compile(r"^BLEU\|nrefs:1\|case:(mixed|lc)\|.*\|version:[\w.]+ = \d+\.\d+ ", re.M)
#: Test lines translated (the slice's test set has 200).
LINES = 20


def quickstart_commands(text: str) -> list[list[str]]:
    """The argv (without the leading `seq2seq`) of every command in the marked blocks."""
    commands = []
    blocks = text.split(MARKER)[1:]
    assert blocks, f"README.md has no {MARKER} block"
    for block in blocks:
        fence = re.match(r"\s*```[a-z]*\n(.*?)\n```", block, re.S)
        assert fence, f"{MARKER} must come just before a fenced code block"
        for line in fence.group(1).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                assert argv[0] == "seq2seq", f"not a seq2seq command: {line!r}"
                commands.append(argv[1:])
    return commands


def tiny_training(data_root: Path) -> list[str]:
    """Overrides that shrink the recipe to seconds (as tests/test_train.py's tiny_overrides)."""
    return [
        *("--data.root", str(data_root), "--data.download", "null"),
        *("--data.train.max_pairs", "1000", "--data.valid.max_pairs", "40"),
        *("--data.test.max_pairs", "20"),
        *("--data.tokenizer.vocab_size", "400", "--data.max_tokens", "1200"),
        *("--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64"),
        *("--model.n_encoder_layers", "1", "--model.n_decoder_layers", "1"),
        *("--optim.lr", "0.005", "--optim.warmup_steps", "10"),
        *("--trainer.max_steps", "20", "--trainer.max_time_minutes", "null"),
        *("--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "5"),
        *("--trainer.save_top_k", "2", "--trainer.average_last", "0", "--trainer.threads", "1"),
        *("--decode.beam", "2", "--decode.max_len_a", "1.0", "--decode.max_len_b", "5"),
    ]


def option(argv: list[str], *names: str) -> str:
    """The value after the first of `names` in argv."""
    for i, token in enumerate(argv[:-1]):
        if token in names:
            return argv[i + 1]
    raise AssertionError(f"no {'/'.join(names)} in `seq2seq {shlex.join(argv)}`")


def read_gz(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:n]


def test_readme_quickstart_runs(multi30k_slice, tmp_path, monkeypatch, capsys):
    commands = quickstart_commands(README.read_text(encoding="utf-8"))
    names = [argv[0] for argv in commands]
    assert names[0] == "train" and {"translate", "evaluate"} <= set(names), names
    monkeypatch.chdir(tmp_path)  # the README's relative paths (runs/..., in.en) land here
    sources = read_gz(multi30k_slice / "test_2016_flickr.en.gz", LINES)
    references = read_gz(multi30k_slice / "test_2016_flickr.de.gz", LINES)
    run_dir = None
    for argv in commands:
        if argv[0] == "train":
            recipe = Path(argv[1])
            assert (REPO / recipe).is_file(), f"the README's recipe {recipe} does not exist"
            argv = ["train", str(REPO / recipe), *argv[2:], *tiny_training(multi30k_slice)]
            run_dir = tmp_path / "runs" / recipe.stem  # the default --run-dir
        elif argv[0] == "translate":
            assert Path(option(argv, "-m", "--model")) == Path("runs", recipe.stem), (
                "translate's -m is not where the train command above writes"
            )
            Path(option(argv, "-i", "--input")).write_text("\n".join(sources) + "\n")
        elif argv[0] == "evaluate":
            Path(option(argv, "--ref")).write_text("\n".join(references) + "\n")
        capsys.readouterr()
        assert main(argv) == 0, f"`seq2seq {shlex.join(argv)}` failed"
        out = capsys.readouterr().out
        if argv[0] == "train":
            results = json.loads((run_dir / "results.json").read_text())
            assert {"bleu", "bleu_lc", "chrf"} <= set(results["test"]), results["test"]
            assert json.loads(out)["steps"] == results["steps"]
        elif argv[0] == "translate":
            hyps = Path(option(argv, "-o", "--output")).read_text(encoding="utf-8")
            assert hyps.endswith("\n") and len(hyps.split("\n")) - 1 == len(sources)
        elif argv[0] == "evaluate":
            found = BLEU_LINE.search(out)
            assert found, f"no BLEU line with a signature in:\n{out}"
            assert found.group(1) == ("lc" if "--lowercase" in argv else "mixed")
    assert run_dir is not None
    # The Python API snippet, on the model the quickstart just trained.
    names: dict = {}
    exec(python_api_block(README.read_text(encoding="utf-8")), names)  # noqa: S102
    assert len(names["best"]) == 2 and names["best"][1] == ""  # a 20-step model may say ""
    assert 1 <= len(names["nbest"][0]) <= 2 and isinstance(names["nbest"][0][0][1], float)
    assert names["log_probs"][0] < 0


def python_api_block(text: str) -> str:
    """The fenced Python block right after `<!-- python-api -->`."""
    found = re.search(re.escape(API_MARKER) + r"\s*```python\n(.*?)\n```", text, re.S)
    assert found, f"README.md has no python block after {API_MARKER}"
    return found.group(1)


def own_data_section(text: str) -> dict:
    """The `data` section of the YAML block right after `<!-- own-data -->`."""
    found = re.search(re.escape(OWN_DATA_MARKER) + r"\s*```yaml\n(.*?)\n```", text, re.S)
    assert found, f"README.md has no yaml block after {OWN_DATA_MARKER}"
    doc = yaml.safe_load(found.group(1))
    assert set(doc) == {"data"}, "the own-data block shows a recipe's data section only"
    return doc["data"]


def write_corpus(corpus: dict, root: Path, src: list[str], tgt: list[str]) -> None:
    """The files a corpus of the README names, holding src/tgt lines in its format."""
    if "tsv" in corpus:
        text = "".join(f"{s}\t{t}\n" for s, t in zip(src, tgt, strict=True))
        (root / corpus["tsv"]).write_text(text, encoding="utf-8")
        return
    for name, lines in ((corpus["src"], src), (corpus["tgt"], tgt)):
        path = root / name
        if ".sgm" in path.suffixes:
            segs = "".join(f'<seg id="{i}">{line}</seg>\n' for i, line in enumerate(lines, 1))
            text = f'<refset setid="t">\n<doc docid="d1">\n{segs}</doc>\n</refset>\n'
        else:
            text = "".join(f"{line}\n" for line in lines)
        if path.suffix == ".gz":
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")


def test_readme_own_data_recipe_prepares(multi30k_slice, tmp_path, monkeypatch, capsys):
    data = own_data_section(README.read_text(encoding="utf-8"))
    src, tgt = (read_gz(multi30k_slice / f"train.{lang}.gz", 600) for lang in ("en", "de"))
    root = tmp_path / data["root"]
    root.mkdir(parents=True)
    train = data["train"] if isinstance(data["train"], list) else [data["train"]]
    for i, corpus in enumerate(train):  # each training corpus its own 200 pairs
        write_corpus(corpus, root, src[200 * i : 200 * i + 200], tgt[200 * i : 200 * i + 200])
    for split in ("valid", "test"):
        write_corpus(data[split], root, src[-100:], tgt[-100:])
    # A copy of the default recipe with the README's data section in place of its own.
    recipe = yaml.safe_load((REPO / "recipes" / "multi30k_en_de.yaml").read_text())
    recipe["data"].update(data)
    (tmp_path / "my_recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)  # `root` is relative, as in the README
    argv = ["prepare", "my_recipe.yaml", "--run-dir", "runs/my", "--json"]
    capsys.readouterr()
    assert main([*argv, "--data.tokenizer.vocab_size", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    corpora = report["train"]["corpora"]
    assert [c["read"] for c in corpora] == [200] * len(train)
    weights = [corpus.get("weight", 1.0) for corpus in train]
    assert [c["epoch_pairs"] for c in corpora] == [round(200 * w) for w in weights]
    assert report["splits"]["valid"]["pairs"] == report["splits"]["test"]["pairs"] == 100


@pytest.mark.parametrize(
    "text",
    [
        "no marker here\n```bash\nseq2seq train r.yaml\n```\n",
        f"{MARKER}\n\nsome prose first\n```bash\nseq2seq train r.yaml\n```\n",
        f"{MARKER}\n```bash\npip install torch\n```\n",
    ],
)
def test_quickstart_parser_refuses_what_it_cannot_check(text):
    with pytest.raises(AssertionError):
        quickstart_commands(text)


def test_quickstart_parser_reads_commands_and_drops_comments():
    text = f"x\n{MARKER}\n```bash\nseq2seq train r.yaml   # a comment\n\nseq2seq plot 'a b'\n```\n"
    assert quickstart_commands(text) == [["train", "r.yaml"], ["plot", "a b"]]
