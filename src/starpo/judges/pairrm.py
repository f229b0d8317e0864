"""llm-blender's PairRM behind the pairwise judge interface (an optional package)."""

from __future__ import annotations

import math
from typing import Sequence

from starpo.canonical import last_user_text
from starpo.errors import StarpoError
from starpo.judges.base import PairwiseJudge, Prompt
from starpo.runtime import Runtime


class PairRMJudge(PairwiseJudge):
    """llm-blender's PairRM (``llm-blender/PairRM``) behind the pairwise interface.

    PairRM ranks the k candidates of a prompt; its ranks are lower-is-better (1 = best)
    and its scores higher-is-better. ``rank`` returns PairRM's scores (higher is better);
    ``prefer`` = ``sigmoid(score_a - score_b)`` from ranking the two candidates. The prompt
    given to PairRM is the last user message.

    llm-blender pins ``transformers<5`` and is not a starpo dependency: install it in a
    separate environment (``pip install git+https://github.com/yuchenlin/LLM-Blender.git``)
    to use this judge.
    """

    name = "pairrm"

    def __init__(self, model: str = "llm-blender/PairRM", *, device=None, batch_size: int = 8,
                 both_orders: bool = True):
        super().__init__(both_orders=both_orders)
        try:
            import llm_blender  # type: ignore[import-not-found]
        except ImportError:
            raise StarpoError(
                "the PairRM judge needs the llm-blender package, which is not installed (it "
                "pins transformers<5, so starpo does not depend on it); install it with `pip "
                "install git+https://github.com/yuchenlin/LLM-Blender.git` in an environment "
                "where transformers<5 is acceptable, or use judge.type reward_model / gold"
            ) from None
        self.batch_size = batch_size
        self.blender = llm_blender.Blender()
        self.blender.loadranker(model, device=str(Runtime.local(device).device))

    def _scores(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]]):
        return self.blender.rank([last_user_text(p) for p in prompts],
                                 [list(g) for g in groups], return_scores=True,
                                 batch_size=self.batch_size)

    def prefer(self, prompts, first, second) -> list[float]:
        scores = self._scores(prompts, [[a, b] for a, b in zip(first, second)])
        return [1.0 / (1.0 + math.exp(-(float(s[0]) - float(s[1])))) for s in scores]

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        return self.rank_many([prompt], [candidates])[0]

    def rank_many(self, prompts, groups) -> list[list[float]]:
        return [[float(x) for x in s] for s in self._scores(prompts, groups)]
