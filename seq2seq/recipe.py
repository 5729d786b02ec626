"""YAML recipes onto the typed `Recipe` dataclass, through jsonargparse (strict, typed)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from seq2seq.config import CorpusConfig, ModelConfig, Recipe, preset


class RecipeError(ValueError):
    """A recipe that cannot be loaded: the message is one line naming the file and the key."""


def recipe_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="seq2seq", exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Recipe, fail_untyped=True)
    return parser


def load_recipe(path: str | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read recipe `path` (or only defaults when None), then apply dotted `overrides`
    such as ["--trainer.max_steps", "100", "--data.root", "DIR"]."""
    if path is not None and not os.path.isfile(path):
        raise RecipeError(f"{path}: no such recipe file")
    return parse_recipe(path, overrides, path or "recipe")


def parse_recipe(config: str | None, overrides: Sequence[str], name: str) -> Recipe:
    """`config` is a recipe path or YAML text; errors are one line starting with `name`."""
    argv = (["--config", config] if config else []) + list(overrides)
    if config:
        doc = _read_yaml(config)
        if doc is _EMPTY:
            raise RecipeError(
                f"{name}: the recipe is empty; give its sections ({', '.join(_SECTIONS)})"
            )
        _check_sections(doc, name)
        _check_corpora(doc, name)
        _check_list_overrides(doc, overrides, name)
    parser = recipe_parser()
    try:
        sections = parser.instantiate(parser.parse_args(argv))
        return Recipe(**{f.name: sections[f.name] for f in dataclasses.fields(Recipe)})
    except Exception as err:  # jsonargparse raises ArgumentError, dataclasses raise ValueError
        detail = " ".join(str(err).split())
        raise RecipeError(f"{name}: {detail}") from err


#: `_read_yaml`'s document of a recipe with no content (blank, or comments only).
_EMPTY = object()
_SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))


def _read_yaml(config: str) -> object:
    """A recipe path's or YAML text's document: `_EMPTY` where it holds nothing, None where
    it does not parse (jsonargparse then reports the YAML error with its position)."""
    try:
        doc = yaml.safe_load(Path(config).read_text() if os.path.isfile(config) else config)
    except (OSError, yaml.YAMLError):
        return None
    return _EMPTY if doc is None else doc


def _check_list_overrides(doc: object, overrides: Sequence[str], name: str) -> None:
    """`--data.train.KEY V` where the recipe's data.train is a list of corpora would set KEY
    on the last corpus alone (jsonargparse's reading): refuse it, naming the corpora."""
    data = doc.get("data") if isinstance(doc, dict) else None
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, list):
        return
    for option in overrides:
        if option.startswith("--data.train."):
            key = option.split("=", 1)[0].removeprefix("--")
            raise RecipeError(
                f"{name}: --{key} is ambiguous: data.train lists {len(train)} corpora; set "
                f"{key.rsplit('.', 1)[-1]} on each of them in the recipe"
            )


def _check_sections(doc: object, name: str) -> None:
    """A recipe (`doc`, its YAML document) is a mapping of sections (model, data, ...), each a
    mapping of its keys: say so plainly, naming the section, where jsonargparse's
    instantiation would fail deep inside ("argument after ** must be a mapping")."""
    sections = _SECTIONS
    if doc is not None and not isinstance(doc, dict):
        raise RecipeError(
            f"{name}: a recipe is a mapping of sections ({', '.join(sections)}), "
            f"not a {type(doc).__name__}"
        )
    for section in sections:
        if isinstance(doc, dict) and section in doc and not isinstance(doc[section], dict):
            raise RecipeError(
                f"{name}: {section} must be a mapping of keys indented under '{section}:' "
                f"(delete the line for its defaults), not {doc[section]!r}"
            )


def _check_corpora(doc: object, name: str) -> None:
    """data.valid/test are one corpus (a mapping) each, data.train one or a list of them: say
    what is wrong with a corpus plainly, naming its key, where jsonargparse would report every
    way the value fails to match `CorpusConfig | list[CorpusConfig]`."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        return
    for split in ("valid", "test"):
        if isinstance(data.get(split), list):
            raise RecipeError(
                f"{name}: data.{split} is a list; give one corpus (src and tgt files, a tsv, "
                "or a dataset)"
            )
    train = data.get("train")
    items = enumerate(train) if isinstance(train, list) else [(None, train)]
    known = {f.name for f in dataclasses.fields(CorpusConfig)}
    for i, corpus in items:
        key = "data.train" if i is None else f"data.train[{i}]"
        if corpus is None and i is None:
            continue
        if not isinstance(corpus, dict):
            raise RecipeError(f"{name}: {key} must be a corpus (a mapping), not {corpus!r}")
        if unknown := sorted(set(corpus) - known):
            raise RecipeError(
                f"{name}: {key} has no key {unknown[0]!r} (keys: {', '.join(sorted(known))})"
            )
        weight = corpus.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise RecipeError(f"{name}: {key}.weight={weight!r} is not a number")


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain, YAML-able dict (tuples become lists)."""
    return yaml.safe_load(dump_recipe(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, loadable again by `load_recipe`."""
    return yaml.safe_dump(_plain(dataclasses.asdict(recipe)), sort_keys=False)


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def model_config_for(
    recipe: str | None,
    preset_name: str | None,
    vocab_size: int | None,
    overrides: Sequence[str] = (),
) -> ModelConfig:
    """The model shape of a recipe or a preset, with a joint vocabulary of `vocab_size`
    (default: the recipe's tokenizer size)."""
    if (recipe is None) == (preset_name is None):
        raise RecipeError("give either a recipe file or --preset NAME")
    if preset_name is not None:
        # The preset as an in-memory recipe (jsonargparse takes YAML text for --config).
        base = yaml.safe_dump({"model": _plain(dataclasses.asdict(preset(preset_name)))})
        loaded = parse_recipe(base, overrides, f"--preset {preset_name}")
    else:
        loaded = load_recipe(recipe, overrides)
    vocab = loaded.data.tokenizer.vocab_size if vocab_size is None else vocab_size
    return dataclasses.replace(loaded.model, src_vocab_size=vocab, tgt_vocab_size=vocab)
