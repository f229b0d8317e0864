"""Recipes: typed validation with dotted paths, overrides, the shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest

from starpo.recipe import load_recipe, recipe_from_dict
from starpo.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"stages": [{"type": "sft", "data": {"sources": [{"path": "world:sft"}]}},
                   {"type": "dpo", "data": {"sources": [{"path": "world:preference"}]}}]}


def test_unknown_key_names_its_dotted_path_with_stages_by_name():
    bad = {"stages": [{"type": "sft", "data": {"sources": [{"path": "x", "frac": 0.5}]}}]}
    with pytest.raises(RecipeError, match=r"stages\.sft\.data\.sources\.0\.frac: unknown key"):
        recipe_from_dict(bad)


def test_wrong_type_names_its_dotted_path():
    # addressed by index or by name, the error names the stage as the user knows it
    for ov in ("stages.1.beta=high", "stages.dpo.beta=high"):
        with pytest.raises(RecipeError, match=r"^recipe: stages\.dpo\.beta: Input should be"):
            recipe_from_dict(BASE, overrides=[ov])
    with pytest.raises(RecipeError, match=r"model\.tiny\.hidden_size"):
        recipe_from_dict({**BASE, "model": {"tiny": {"hidden_size": "big"}}})


def test_a_named_stage_is_named_and_an_ambiguous_one_indexed():
    named = {"stages": [BASE["stages"][0], {**BASE["stages"][1], "name": "simpo"}]}
    with pytest.raises(RecipeError, match=r"stages\.simpo\.beta: Input should be greater"):
        recipe_from_dict(named, overrides=["stages.simpo.beta=-1"])
    # two stages that would go by "dpo" (the second's name defaults to its type): index
    two = {"stages": [{**BASE["stages"][1], "name": "dpo"}, BASE["stages"][1]]}
    with pytest.raises(RecipeError, match=r"stages\.1\.name: duplicate stage name"):
        recipe_from_dict(two)
    clash = {"stages": [{**BASE["stages"][1], "name": "dpo"},
                        {**BASE["stages"][1], "name": "x", "beta": "high"}]}
    with pytest.raises(RecipeError, match=r"stages\.x\.beta"):
        recipe_from_dict(clash)


def test_unknown_keys_and_values_suggest_the_closest_valid_one():
    cases = {"stages.dpo.betta=1": r"stages\.dpo\.betta: unknown key; did you mean `beta`\?$",
             "stages.sft.train.lrr=1": r"stages\.sft\.train\.lrr: unknown key; did you mean "
                                       r"`lr`\?$",
             "modle.x=1": r"modle: unknown key; did you mean `model`\?$",
             "stages.sft.train.scheduler=cosin": r"scheduler: Input should be .*; did you mean "
                                                 r"`cosine`\?$",
             "stages.dpo.loss=simpp": r"stages\.dpo\.loss: unknown preference loss .*did you "
                                      r"mean `simpo`\?$",
             "stages.dpo.type=dop": r"did you mean `dpo`\?$",
             "stages.dop.beta=1": r"no list item 'dop' at stages\.dop; there are sft, dpo; "
                                  r"did you mean `dpo`\?$"}
    for ov, pattern in cases.items():
        with pytest.raises(RecipeError, match=pattern):
            recipe_from_dict(BASE, overrides=[ov])
    # nothing close: no guess
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(BASE, overrides=["stages.dpo.zzzzzz=1"])
    assert str(info.value).endswith("stages.dpo.zzzzzz: unknown key")


def test_recipe_level_checks_name_the_stage():
    rec = {"stages": [BASE["stages"][0],
                      {"type": "online", "judge": {"type": "pairwise_rm", "path": "sft"},
                       "data": {"sources": [{"path": "world:prompt"}]}}]}
    with pytest.raises(RecipeError, match=r"^recipe: stages\.online\.judge\.path: 'sft' is "
                                          r"a sft stage"):
        recipe_from_dict(rec)


def test_overrides_by_index_and_by_stage_name():
    r = recipe_from_dict(BASE, overrides=["stages.dpo.beta=0.3", "stages.0.train.lr=2e-4",
                                          "seed=7", "stages.dpo.loss=simpo"])
    assert r.stages[1].beta == 0.3 and r.stages[1].loss == "simpo"
    assert r.stages[0].train.lr == 2e-4 and r.seed == 7
    with pytest.raises(RecipeError, match="no list item 'nope'"):
        recipe_from_dict(BASE, overrides=["stages.nope.beta=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        recipe_from_dict(BASE, overrides=["stages.dpo.beta"])


def test_a_stage_name_wins_over_another_stages_type():
    """``stages.dpo`` is the stage named dpo, even after a stage of type dpo named else."""
    rec = {"stages": [{**BASE["stages"][1], "name": "first"},
                      {**BASE["stages"][1], "name": "dpo"}]}
    r = recipe_from_dict(rec, overrides=["stages.dpo.beta=0.7"])
    assert r.stages[0].beta == 0.1 and r.stages[1].beta == 0.7


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
