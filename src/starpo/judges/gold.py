"""The embedded world's gold reward as a judge: the upper bound the others are measured
against (it reads the reward the evaluation scores with)."""

from __future__ import annotations

from typing import Sequence

from starpo import world
from starpo.canonical import last_user_text
from starpo.judges.base import PointwiseJudge, Prompt, _check_lengths



class GoldJudge(PointwiseJudge):
    """The embedded world's gold reward, on the last user message and the response."""

    name = "gold"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses)
        texts = [last_user_text(p) for p in prompts]
        return [float(v) for v in world.gold_rewards(texts, list(responses))]
