"""PairwiseJudge.rank_many: every game of every prompt in one batched prefer call, with
the same round-robin scores as ranking each prompt on its own (both orders or not)."""

from __future__ import annotations

import math

import pytest

from starpo.judges.base import PairwiseJudge, rank_groups

QUALITY = {"bad": -1.0, "ok": 0.0, "good": 1.0, "great": 2.0}


class Biased(PairwiseJudge):
    """P(first better), inflated toward the first position; counts its batched calls."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def prefer(self, prompts, first, second):
        self.calls.append(len(prompts))
        return [0.6 / (1.0 + math.exp(-(QUALITY[a] - QUALITY[b]) - len(p))) + 0.4
                for p, a, b in zip(prompts, first, second)]


@pytest.mark.parametrize("both_orders", [True, False])
def test_rank_many_is_one_call_with_the_scores_of_rank(both_orders):
    prompts = ["q", "qq", "qqq", "x"]
    groups = [["ok", "great", "bad", "good"], ["bad", "good"], ["ok"], []]
    judge = Biased(both_orders=both_orders)
    many = rank_groups(judge, prompts, groups)
    games = 6 + 1
    assert judge.calls == ([2 * games] if both_orders else [games, games])
    one = Biased(both_orders=both_orders)
    assert many == [pytest.approx(one.rank(p, g)) for p, g in zip(prompts, groups)]
    assert many[2] == [0.5] and many[3] == []
    if both_orders:
        assert sum(many[0]) == pytest.approx(2.0)          # each game hands out one point
    order = sorted(range(4), key=lambda i: -many[0][i])
    assert [groups[0][i] for i in order] == ["great", "good", "ok", "bad"]
