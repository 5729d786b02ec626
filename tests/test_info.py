"""`seq2seq info`: the module tree and a parameter breakdown that adds up."""

import json

import pytest

from seq2seq.cli import main


def test_info_json_reports_the_paper_base_parameter_count(capsys):
    assert main(["info", "--preset", "base", "--vocab-size", "37000", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == 63_082_496
    assert sum(info["components"].values()) == info["total_parameters"]
    stacks = info["stacks"]
    assert stacks["embeddings"] == 37000 * 512
    assert stacks["encoder"] == 6 * info["per_layer"]["encoder"]["total"] == 6 * 3_152_384
    assert stacks["decoder"] == 6 * info["per_layer"]["decoder"]["total"] == 6 * 4_204_032
    assert info["per_layer"]["decoder"]["cross_attention"] == 4 * (512 * 512 + 512)
    assert abs(sum(info["shares_percent"].values()) - 100) < 0.05


def test_info_prints_the_module_tree_and_the_breakdown(capsys):
    assert main(["info", "--preset", "small", "--vocab-size", "8000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Transformer(")
    assert "(cross_attn): CrossAttention(" in out
    assert "encoder: 3 x" in out and "decoder: 3 x" in out and "total" in out


def test_info_of_a_recipe_uses_its_model_and_vocabulary(capsys):
    assert main(["info", "recipes/wmt14_en_de_big.yaml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["d_model"] == 1024 and info["config"]["src_vocab_size"] == 32000


def test_preset_with_overrides_counts_the_pre_norm_final_layer_norms(capsys):
    args = ["info", "--preset", "tiny", "--vocab-size", "100", "--json"]
    assert main(args) == 0
    post = json.loads(capsys.readouterr().out)
    assert main([*args, "--model.pre_norm", "true"]) == 0
    pre = json.loads(capsys.readouterr().out)
    assert pre["stacks"]["final_layer_norms"] == 2 * 2 * 32
    assert pre["total_parameters"] - post["total_parameters"] == 2 * 2 * 32


def test_override_values_are_never_taken_for_the_recipe_argument():
    from seq2seq.cli import split_overrides

    own, overrides = split_overrides(
        ["info", "--preset", "tiny", "--model.pre_norm", "true", "--json"]
    )
    assert own == ["info", "--preset", "tiny", "--json"]
    assert overrides == ["--model.pre_norm", "true"]
    own, overrides = split_overrides(["train", "r.yaml", "--trainer.max_steps=5", "--run-dir", "x"])
    assert own == ["train", "r.yaml", "--run-dir", "x"] and overrides == ["--trainer.max_steps=5"]


def test_a_vocab_size_below_one_is_refused_not_replaced_by_the_default(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["info", "--preset", "base", "--vocab-size", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "seq2seq info: error: argument --vocab-size: must be at least 1, got 0"
