"""The world labeler judge: the world's noisy, length-biased annotator behind the pairwise
interface (never the gold reward itself)."""

from __future__ import annotations

import pytest

from starpo import world
from starpo.judges import make_judge
from starpo.judges.world_labeler import WorldLabelerJudge
from starpo.recipe import JudgeSpec


def _prompt_and_responses():
    w = world.World(0)
    row = w.preference_rows(1)[0]
    prompt = row["prompt"][-1]["content"]
    best = world.best_response(prompt)
    return prompt, best, world.REFUSALS[0]


def test_verdicts_are_deterministic_and_mostly_follow_gold():
    prompt, good, bad = _prompt_and_responses()
    assert world.gold_reward(prompt, good) > world.gold_reward(prompt, bad)
    j = WorldLabelerJudge(seed=0)
    again = WorldLabelerJudge(seed=0)
    assert j.compare(prompt, good, bad) == again.compare(prompt, good, bad)
    assert j.compare(prompt, good, bad) + j.compare(prompt, bad, good) == pytest.approx(1.0)
    # over many seeds the annotator prefers the gold-better answer most of the time, but
    # not always (it flips 12% of its verdicts)
    wins = [WorldLabelerJudge(seed=s).compare(prompt, good, bad) for s in range(200)]
    assert 0.7 < sum(wins) / len(wins) < 1.0


def test_it_is_length_biased_unlike_gold():
    """Two answers of equal gold value: the longer one is preferred more often than not."""
    prompt, good, _ = _prompt_and_responses()
    padded = good + " " + " ".join(["indeed"] * 30)
    g_short, g_long = world.gold_reward(prompt, good), world.gold_reward(prompt, padded)
    wins = [WorldLabelerJudge(seed=s).compare(prompt, padded, good) for s in range(200)]
    # gold does not reward the padding; the annotator does, per word
    assert g_long <= g_short
    assert sum(wins) / len(wins) > 0.5 + (g_short - g_long)


def test_registered_as_a_pairwise_judge():
    j = make_judge(JudgeSpec(type="world_labeler", options={"seed": 3}))
    assert isinstance(j, WorldLabelerJudge) and j.seed == 3
    with pytest.raises(ValueError, match="pointwise"):
        from starpo.recipe import EvalStage
        EvalStage(type="eval", judge={"type": "world_labeler"})
