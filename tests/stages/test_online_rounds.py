"""The per-round gold signal: what the judge's choices are worth by the world's reward."""

from __future__ import annotations

import pytest

from starpo import world
from starpo.stages import online_rounds as O


def _round(prompt_text, texts, scores):
    rec = {"round": 1, "index": 0, "id": "p0", "prompt": [{"role": "user", "content": prompt_text}],
           "samples": [{"text": t, "score": s, "num_tokens": len(t.split()), "finished": True}
                       for t, s in zip(texts, scores)]}
    [ch] = O.select_pair(texts, scores)
    rec["pair"], rec["dropped"] = [ch.chosen, ch.rejected], None   # an older record: no "pairs"
    return [rec], O.pair_records([rec])


def test_gold_signal_of_a_world_round():
    prompt = world.World(0).prompt_rows(1)[0]["prompt"][-1]["content"]
    good, bad = world.best_response(prompt), world.REFUSALS[0]
    # a judge that prefers the refusal: its pair disagrees with gold
    samples, pairs = _round(prompt, [good, bad], [0.0, 1.0])
    stats = O.round_statistics(samples, pairs)
    assert stats["pair_gold_agreement"] == 0.0
    assert stats["mean_gold"] == pytest.approx(
        (world.gold_reward(prompt, good) + world.gold_reward(prompt, bad)) / 2)
    assert stats["mean_chosen_gold"] == pytest.approx(world.gold_reward(prompt, bad))
    samples, pairs = _round(prompt, [good, bad], [1.0, 0.0])
    assert O.round_statistics(samples, pairs)["pair_gold_agreement"] == 1.0


def test_no_gold_signal_for_prompts_the_world_does_not_know():
    samples, pairs = _round("Write a haiku about rust.", ["a", "b b"], [0.0, 1.0])
    stats = O.round_statistics(samples, pairs)
    assert stats["mean_gold"] is None and stats["pair_gold_agreement"] is None
