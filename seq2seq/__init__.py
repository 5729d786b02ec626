"""seq2seq: Transformer translation models. The Python API is `Translator`:

    from seq2seq import Translator

    translator = Translator.load("runs/multi30k_en_de")
    translator.translate(["A dog runs in the park."])

`Translator` is imported on first use, so `import seq2seq` (which every command does) stays
cheap: it loads neither torch nor the decoding code.
"""

from __future__ import annotations

__all__ = ["Translator"]


def __getattr__(name: str):
    if name == "Translator":
        from seq2seq.inference.translator import Translator

        return Translator
    raise AttributeError(f"module 'seq2seq' has no attribute {name!r}")
