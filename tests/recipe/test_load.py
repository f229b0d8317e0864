"""Recipes: typed validation with dotted paths, overrides, the shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest

from starpo.recipe import load_recipe, recipe_from_dict
from starpo.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"stages": [{"type": "sft", "data": {"sources": [{"path": "world:sft"}]}},
                   {"type": "dpo", "data": {"sources": [{"path": "world:preference"}]}}]}


def test_unknown_key_names_its_dotted_path():
    bad = {"stages": [{"type": "sft", "data": {"sources": [{"path": "x", "frac": 0.5}]}}]}
    with pytest.raises(RecipeError, match=r"stages\.0\.data\.sources\.0\.frac: unknown key"):
        recipe_from_dict(bad)


def test_wrong_type_names_its_dotted_path():
    with pytest.raises(RecipeError, match=r"stages\.1\.beta"):
        recipe_from_dict(BASE, overrides=["stages.1.beta=high"])
    with pytest.raises(RecipeError, match=r"model\.tiny\.hidden_size"):
        recipe_from_dict({**BASE, "model": {"tiny": {"hidden_size": "big"}}})


def test_overrides_by_index_and_by_stage_name():
    r = recipe_from_dict(BASE, overrides=["stages.dpo.beta=0.3", "stages.0.train.lr=2e-4",
                                          "seed=7", "stages.dpo.loss=simpo"])
    assert r.stages[1].beta == 0.3 and r.stages[1].loss == "simpo"
    assert r.stages[0].train.lr == 2e-4 and r.seed == 7
    with pytest.raises(RecipeError, match="no list item 'nope'"):
        recipe_from_dict(BASE, overrides=["stages.nope.beta=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        recipe_from_dict(BASE, overrides=["stages.dpo.beta"])


def test_unknown_stage_type_and_duplicate_names():
    with pytest.raises(RecipeError, match=r"stages\.0"):
        recipe_from_dict({"stages": [{"type": "ppo", "data": {"sources": []}}]})
    dup = {"stages": [BASE["stages"][0], BASE["stages"][0]]}
    with pytest.raises(RecipeError, match="duplicate stage name 'sft'"):
        recipe_from_dict(dup)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("stages: [ {type: sft,")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(p)
