"""Every shipped recipe loads strictly; bad keys and types are one line naming key and file."""

from pathlib import Path

import pytest

from seq2seq.cli import main
from seq2seq.recipe import RecipeError, dump_recipe, load_recipe

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {
        "multi30k_en_de.yaml",
        "multi30k_en_de_tiny.yaml",
        "wmt14_en_de_base.yaml",
        "wmt14_en_de_base_raw.yaml",
        "wmt14_en_de_big.yaml",
        "iwslt14_de_en.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(str(path))
    assert recipe.model.d_model % recipe.model.n_heads == 0
    assert all(c.src or c.dataset for _, c in recipe.data.train_corpora())
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(str(again)) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_key_is_commented(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line or _continues_previous(path, number), (
                f"{path.name}:{number} has no comment"
            )


def _continues_previous(path: Path, number: int) -> bool:
    """A key right after a commented sibling of the same pair (tgt after src, max_len_b after a)."""
    previous = path.read_text().splitlines()[number - 2]
    return "#" in previous


def test_wmt_recipes_are_the_papers_setups():
    base = load_recipe("recipes/wmt14_en_de_base.yaml")
    big = load_recipe("recipes/wmt14_en_de_big.yaml")
    assert (base.model.d_model, base.model.d_ff, base.model.n_heads) == (512, 2048, 8)
    assert (big.model.d_model, big.model.d_ff, big.model.n_heads, big.model.dropout) == (
        1024,
        4096,
        16,
        0.3,
    )
    for r in (base, big):
        assert (r.decode.beam, r.decode.lenpen) == (4, 0.6)
        assert r.data.max_tokens * r.trainer.accumulate_grad_batches == 25_000
        assert r.trainer.average_last > 1
    assert (base.trainer.max_steps, big.trainer.max_steps) == (100_000, 300_000)


def test_dotted_overrides_are_applied_and_type_checked():
    recipe = load_recipe(
        "recipes/multi30k_en_de.yaml", ["--trainer.max_steps", "100", "--data.root", "/x"]
    )
    assert recipe.trainer.max_steps == 100 and recipe.data.root == "/x"
    with pytest.raises(RecipeError, match=r"multi30k_en_de.yaml.*trainer.max_steps.*int"):
        load_recipe("recipes/multi30k_en_de.yaml", ["--trainer.max_steps", "many"])


def test_a_row_tokens_below_one_is_refused_with_the_key_named():
    recipe = load_recipe("recipes/wmt14_en_de_base.yaml", ["--data.row_tokens", "128"])
    assert recipe.data.row_tokens == 128
    with pytest.raises(RecipeError, match=r"data.row_tokens=0 must be positive"):
        load_recipe("recipes/wmt14_en_de_base.yaml", ["--data.row_tokens", "0"])


def test_a_val_beam_below_one_is_refused_naming_trainer_val_beam():
    """Up front, not as "decode.beam=0 must be at least 1" once the data is prepared."""
    with pytest.raises(RecipeError, match=r"trainer.val_beam=0 must be at least 1") as err:
        load_recipe("recipes/multi30k_en_de_tiny.yaml", ["--trainer.val_beam", "0"])
    assert "decode.beam" not in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_a_recipe_file_names_the_key_and_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 256\n")
    assert main(["train", str(bad), "--print_config"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.yaml" in err and "d_modle" in err


def test_wrong_type_in_a_recipe_file_names_the_key_and_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: lots\n")
    assert main(["train", str(bad), "--print_config"]) == 1
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "trainer.max_steps" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: 3\n", "model must be a mapping of keys indented under 'model:'"),
        ("data:\n  src_lang: en\ntrainer:\n", "trainer must be a mapping of keys"),
        ("optim: [1, 2]\n", "optim must be a mapping of keys indented under 'optim:'"),
        ("- model\n- data\n", "a recipe is a mapping of sections (model, data, optim, "),
    ],
)
def test_a_section_that_is_no_mapping_is_named_in_plain_words(tmp_path, capsys, text, message):
    """Not jsonargparse's "functools.partial(...) argument after ** must be a mapping"."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["train", str(bad), "--print_config"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"bad.yaml: {message}" in err
    assert "functools" not in err


@pytest.mark.parametrize("text", ["", "\n\n", "# a recipe to come\n"])
def test_an_empty_recipe_says_it_is_empty(tmp_path, capsys, text):
    """Not jsonargparse's "Unexpected config:"."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert main(["train", str(empty), "--print_config"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"seq2seq train: error: {empty}: the recipe is empty; give its sections "
        "(model, data, optim, trainer, decode)"
    )


def test_an_override_of_one_key_of_a_list_of_corpora_is_refused_as_ambiguous(tmp_path, capsys):
    """jsonargparse would set it on the last corpus alone."""
    two = tmp_path / "two.yaml"
    two.write_text("data:\n  train:\n    - {src: a.en, tgt: a.de}\n    - {src: b.en, tgt: b.de}\n")
    assert main(["train", str(two), "--data.train.max_pairs", "100", "--print_config"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"seq2seq train: error: {two}: --data.train.max_pairs is ambiguous: data.train lists "
        "2 corpora; set max_pairs on each of them in the recipe"
    )


def test_missing_recipe_file_is_one_clear_line(capsys):
    assert main(["train", "no/such.yaml", "--print_config"]) == 1
    assert "no/such.yaml: no such recipe file" in capsys.readouterr().err


def test_print_config_prints_the_resolved_recipe(capsys):
    assert (
        main(["train", "recipes/multi30k_en_de.yaml", "--print_config", "--model.d_ff", "512"]) == 0
    )
    out = capsys.readouterr().out
    assert "d_ff: 512" in out and "label_smoothing: 0.1" in out


def test_the_tiny_recipe_is_the_published_baselines_configuration():
    r = load_recipe("recipes/multi30k_en_de_tiny.yaml")
    m = r.model
    assert (m.d_model, m.n_heads, m.d_ff, m.n_encoder_layers, m.n_decoder_layers) == (
        128,
        4,
        256,
        4,
        4,
    )
    assert m.dropout == 0.3 and m.share_embeddings
    assert (r.optim.lr, r.optim.warmup_steps, r.optim.schedule) == (0.005, 2000, "inverse_sqrt")
    # The baseline's fairseq copy: label-smoothed cross-entropy by default, data lowercased.
    assert r.optim.label_smoothing == 0.1 and r.data.tokenizer.lowercase
    assert (r.data.max_tokens, r.trainer.max_steps, r.trainer.average_last) == (8192, 8000, 10)
    assert r.decode.beam == 5
