"""The embedded world's simulated annotator as a judge: the analogue of an AI annotator.

It is the labeler that produced the world's preference data (``starpo.world.label_pair``):
it prefers the better response by the gold reward, but with a length bias (longer looks
better) and a share of flipped verdicts, so it is a different function from the gold
reward and optimising against it can drift away from gold, as with a real AI judge. Each
verdict is a single draw seeded by (seed, prompt, first, second): the same comparison
always gets the same verdict, in either batch, and presenting the pair in the other order
is another draw (position noise), which :class:`~starpo.judges.base.PairwiseJudge`
averages out by judging both orders.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from starpo import world
from starpo.canonical import last_user_text
from starpo.judges.base import PairwiseJudge, Prompt


class WorldLabelerJudge(PairwiseJudge):
    name = "world_labeler"

    def __init__(self, seed: int = 0):
        super().__init__(both_orders=True)
        self.seed = seed

    def _rng(self, prompt: str, first: str, second: str) -> random.Random:
        h = hashlib.sha256(f"{self.seed}\x00{prompt}\x00{first}\x00{second}".encode())
        return random.Random(int.from_bytes(h.digest()[:8], "big"))

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        out = []
        for p, a, b in zip(prompts, first, second):
            text = last_user_text(p)
            out.append(1.0 if world.label_pair(text, a, b, self._rng(text, a, b)) else 0.0)
        return out
