"""The layers' import rules, read from the source (STYLE.md): the model never imports its speed
tricks, the data layer never imports the model, training or inference, and decoding never
imports training or Lightning's loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"

#: Top-level modules every layer may use.
TOP = {"config", "constants", "layout", "rundir", "atomic", "recipe"}
#: What each subpackage may import besides the top level and itself.
ALLOWED = {
    "nn": set(),
    "kernels": set(),
    "data": set(),
    "inference": {"nn", "data", "kernels"},
    "training": {"nn", "data", "kernels", "inference"},
    "export": {"nn", "data", "kernels", "inference"},
    "cli": {"nn", "data", "kernels", "inference", "training", "export"},
}


def layer_of(dotted: str) -> str:
    """'seq2seq.nn.loss' -> 'nn'; 'seq2seq.config' -> 'config'."""
    return dotted.split(".")[1]


def imports(path: Path) -> set[str]:
    """The seq2seq modules a file imports, lazily too (dotted, 'seq2seq.' included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seq2seq."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "seq2seq":
            found.update(f"seq2seq.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("seq2seq."))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_top_level_itself_and_the_layers_below(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        used = {layer_of(m) for m in imports(path)}
        wrong = used - TOP - {layer} - ALLOWED[layer]
        assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_top_level_modules_import_no_layer():
    for path in PACKAGE.glob("*.py"):
        if path.name in ("__main__.py", "__init__.py"):  # the command; the lazy public API
            continue
        used = {layer_of(m) for m in imports(path)}
        assert used <= TOP, f"{path.name} imports {sorted(used - TOP)}"


def test_decoding_never_imports_lightning():
    for path in sorted((PACKAGE / "inference").rglob("*.py")):
        assert "lightning" not in path.read_text(), path.name


def test_the_rule_reader_sees_imports():
    loss = imports(PACKAGE / "nn" / "loss.py")
    assert "seq2seq.nn.transformer" in loss and "seq2seq.layout" in loss


def test_the_translate_command_starts_without_importing_datasets_lightning_or_export_engines():
    """Start-up time: `datasets` alone takes over a second to import, transformers more."""
    import subprocess
    import sys

    code = (
        "import sys, seq2seq.inference.translate, seq2seq.inference.checkpoint;"
        "import seq2seq.inference.translator, seq2seq.inference.ensemble;"
        "print(sorted(m for m in ('datasets', 'lightning', 'transformers', 'ctranslate2') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_seq2seq_is_cheap_and_gives_the_translator_on_first_use():
    """Every command imports the package: the public `Translator` must not load torch then."""
    import subprocess
    import sys

    code = (
        "import sys, seq2seq; before = 'torch' in sys.modules;"
        "from seq2seq import Translator;"
        "print(before, Translator.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "seq2seq.inference.translator"]
