"""The config dataclasses refuse, in one line naming the key, what the Python API lets through
untyped (a recipe and the CLI type-check before they get here)."""

import pytest

from seq2seq.config import DecodeConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"beam": 2.5}, "decode.beam=2.5 must be an integer"),
        ({"beam": True}, "decode.beam=True must be an integer"),
        ({"nbest": 1.0}, "decode.nbest=1.0 must be an integer"),
        ({"max_len_b": "10"}, "decode.max_len_b='10' must be an integer"),
        ({"min_len": None}, "decode.min_len=None must be an integer"),
        ({"max_tokens": 4096.0}, "decode.max_tokens=4096.0 must be an integer"),
        ({"max_sentences": 8.5}, "decode.max_sentences=8.5 must be an integer"),
        ({"lenpen": "0.6"}, "decode.lenpen='0.6' must be a number"),
        ({"max_len_a": False}, "decode.max_len_a=False must be a number"),
    ],
)
def test_decode_settings_of_the_wrong_type_are_refused_naming_the_key(settings, message):
    """Not torch's "topk(): argument 'k' must be int, not float" mid-search."""
    with pytest.raises(ValueError) as err:
        DecodeConfig(**settings)
    assert str(err.value) == message


def test_decode_settings_take_any_integer_or_real_number_type():
    import numpy as np

    cfg = DecodeConfig(beam=np.int64(4), lenpen=1, max_len_a=np.float32(1.5), max_sentences=None)
    assert (cfg.beam, cfg.lenpen, cfg.max_len_a) == (4, 1, 1.5)
