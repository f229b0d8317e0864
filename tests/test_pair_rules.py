"""Pair rules (starpo.pair_rules) on hand-made score lists, the registry's import paths, and
the online stage's use of a rule that gives several pairs per prompt."""

from __future__ import annotations

import random

import pytest

from starpo import pair_rules as R
from starpo.errors import RecipeError
from starpo.stages import online_rounds as O

TOL = O.TIE_TOLERANCE


def pick(name, scores, seed=0):
    return R.pairs_of(name, scores, rng=random.Random(seed), tie_tolerance=TOL)


def test_best_worst_and_its_ties():
    assert pick("best_worst", [0.1, 0.9, -0.5, 0.3]) == [(1, 2)]
    assert pick("best_worst", [1.0, 0.0, 1.0, 0.0]) == [(0, 1)]     # earliest takes a slot
    assert pick("best_worst", [0.5, 0.5, 0.5]) == []


def test_mean_minus_2sd_takes_the_sample_nearest_two_deviations_below_the_mean():
    # 2.0, 1.9, …, 0.1, then −0.5 and −1.5: μ ≈ 0.93, σ ≈ 0.85, μ − 2σ ≈ −0.78, nearer −0.5
    # (index 20) than the worst, −1.5 (index 21), which best_worst takes
    scores = [round(2.0 - 0.1 * k, 1) for k in range(20)] + [-0.5, -1.5]
    assert pick("mean_minus_2sd", scores) == [(0, 20)]
    assert pick("best_worst", scores) == [(0, 21)]
    # one far outlier widens σ until μ − 2σ lies nearest the outlier itself
    assert pick("mean_minus_2sd", [2.0, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, -10.0]) == [(0, 8)]
    assert pick("mean_minus_2sd", [1.0, 1.0]) == []         # a tie is no preference


def test_random_pairs_are_uniform_and_ordered_by_score():
    scores = [0.3, 0.9, 0.1, 0.5]
    seen = set()
    for s in range(200):
        [(c, r)] = pick("random", scores, seed=s)
        assert scores[c] > scores[r]
        seen.add(frozenset((c, r)))
    assert len(seen) == 6                                   # every pair of four turns up
    assert pick("random", [0.2, 0.2]) == []                 # a tie is no preference


def test_best_random_draws_among_strictly_worse_candidates():
    draws = {pick("best_random", [0.0, 2.0, 1.0, 2.0, -1.0], seed=s)[0] for s in range(60)}
    assert draws == {(1, 0), (1, 2), (1, 4)}


def several(scores, *, rng, tie_tolerance):
    """Best and second best, each against the worst: two pairs per prompt."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [(order[0], order[-1]), (order[1], order[-1])]


def same(scores, *, rng, tie_tolerance):
    return (0, 0)


def test_a_rule_of_your_own_by_import_path(tmp_path, monkeypatch):
    mod = tmp_path / "my_rules.py"
    mod.write_text("def top2(scores, *, rng, tie_tolerance):\n"
                   "    o = sorted(range(len(scores)), key=lambda i: -scores[i])\n"
                   "    return [(o[0], o[-1]), (o[1], o[-1])]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert R.check_name("my_rules:top2") == "my_rules:top2"
    got = O.select_pair(["a", "b", "c", "d"], [0.2, 0.9, -1.0, 0.5], mode="my_rules:top2")
    assert [(p.chosen, p.rejected, p.rule) for p in got] == [(1, 2, "my_rules:top2"),
                                                              (3, 2, "my_rules:top2")]
    with pytest.raises(RecipeError, match="cannot import"):
        R.check_name("my_rules:nope")
    with pytest.raises(RecipeError, match="unknown pair_selection"):
        R.check_name("best_wrost")


def test_rules_returning_bad_positions_are_refused(monkeypatch):
    monkeypatch.setitem(R.BUILTIN, "same", same)
    with pytest.raises(ValueError, match="two distinct positions"):
        pick("same", [0.1, 0.2])


def test_several_pairs_per_prompt_reach_the_records(monkeypatch):
    monkeypatch.setitem(R.BUILTIN, "several", several)

    class S:
        def __init__(self, text):
            self.text, self.num_tokens, self.finished = text, 1, True
    rows = [{"prompt": [{"role": "user", "content": "q"}], "id": "p0"}]
    gens = [[S("a"), S("b"), S("c")]]
    scores = [[0.1, 0.9, 0.5]]
    choices = O.select_pairs([["a", "b", "c"]], scores, mode="several")
    recs = O.sample_records(1, rows, gens, scores, choices)
    assert recs[0]["pairs"] == [[1, 0], [2, 0]] and recs[0]["pair"] == [1, 0]
    assert recs[0]["rule"] == "several"
    pairs = O.pair_records(recs)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("c", "a")]
    assert O.round_statistics(recs, pairs)["pairs_selected"] == 2
    assert {p["rule"] for p in pairs} == {"several"}


def test_the_recipe_validates_the_rule():
    from starpo.recipe import recipe_from_dict
    base = {"name": "x", "stages": [{"type": "online", "model": "m",
                                     "data": {"sources": [{"path": "world:prompt"}]}}]}
    base["stages"][0]["pair_selection"] = "mean_minus_2sd"
    assert recipe_from_dict(base).stages[0].pair_selection == "mean_minus_2sd"
    base["stages"][0]["pair_selection"] = "best_wrost"
    with pytest.raises(RecipeError, match="unknown pair_selection"):
        recipe_from_dict(base)
