"""The layers' import rules, read from the source: the model never imports its speed tricks,
the data layer never imports the model, training or inference."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seq2seq"

#: Modules every layer may use.
TOP = {"config", "constants", "layout", "rundir", "atomic"}
#: The layers, by module (until they become subpackages, see STYLE.md).
NN = {"model", "cache", "loss", "info"}
KERNELS = {"kernels", "kernels.onednn", "kernels.dropout"}
DATA = {"corpus", "data", "tokenizer", "download", "batching", "datamodule", "prepare"}


def seq2seq_imports(module: str) -> set[str]:
    """The seq2seq modules `module` imports (anywhere in the file, lazily too)."""
    path = PACKAGE.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seq2seq"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n.removeprefix("seq2seq.") for n in names if _is_module(n))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("seq2seq.") for a in node.names if a.name.startswith("seq2seq.")
            )
    return found


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    if not parts:
        return False
    target = PACKAGE.joinpath(*parts)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def test_the_model_imports_only_the_top_level_and_itself():
    for module in NN:
        assert seq2seq_imports(module) <= TOP | NN, module


def test_kernels_import_only_the_top_level_and_each_other():
    for module in KERNELS:
        assert seq2seq_imports(module) <= TOP | KERNELS, module


def test_the_data_layer_never_imports_the_model_training_or_inference():
    for module in DATA:
        assert seq2seq_imports(module) <= TOP | DATA, (module, seq2seq_imports(module) - TOP - DATA)


def test_the_rule_reader_sees_imports():
    assert "kernels" in seq2seq_imports("module") and "model" in seq2seq_imports("loss")
