"""A trained pairwise preference model as a judge, in the spirit of PairRM: it reads the
prompt and *both* responses in one sequence and says how likely the first is the better.

The input layout (the one home of it: the ``pairwise_rm`` stage trains on it, the judge
scores it) is the chat template applied to the prompt's messages followed by one
assistant turn that holds both candidates::

    <prompt messages> + {"role": "assistant", "content": "A: {a}\\nB: {b}"}

so any chat template renders it (the roles still alternate), and the scalar head reads the
last token of the rendered text, as a reward model's does. The logit ``z(a, b)`` is that
of P(a is better than b); :class:`PairwiseRMJudge` turns it into a probability and, like
every :class:`~starpo.judges.base.PairwiseJudge`, asks both orders and averages them, so
``compare(p, a, b) + compare(p, b, a) == 1`` whatever position bias is left after
training.

A checkpoint is the ``pairwise_rm`` stage's ``DIR/<stage>/model/``: a plain
``AutoModelForSequenceClassification`` checkpoint (body + one-logit head) whose
``config.json`` carries :data:`LAYOUT_KEY`, so a reward model is not mistaken for one.
"""

from __future__ import annotations

import math
from typing import Sequence

from starpo.errors import StarpoError
from starpo.judges.base import PairwiseJudge, Prompt, _check_lengths
from starpo.judges.reward_model import RewardModelJudge

# written into config.json by the stage, checked by the judge; a new layout gets a new value
LAYOUT_KEY = "starpo_pairwise_layout"
LAYOUT = "assistant-turn A:/B: v1"


def pair_response(a: str, b: str) -> str:
    """The one assistant turn that shows both candidates to the pairwise model."""
    return f"A: {a}\nB: {b}"


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class PairwiseRMJudge(PairwiseJudge):
    """``prefer(prompts, first, second)`` = σ(z(first, second)) of a pairwise_rm model.

    Scoring is a :class:`~starpo.judges.reward_model.RewardModelJudge` over the joint
    layout (its batching by length, right padding, device and last-token read), so the
    judge sees exactly the tokens the stage trained on. ``rank`` over k candidates is the
    base class's round robin (each candidate's mean both-orders probability of beating
    the others; k(k−1) sequences per prompt, all prompts of a call in one batch run).
    """

    name = "pairwise_rm"

    def __init__(self, path_or_model, tokenizer=None, *, batch_size: int = 16, device=None,
                 model_spec=None):
        super().__init__(both_orders=True)
        self.scorer = RewardModelJudge(path_or_model, tokenizer, input_format="chat_template",
                                       batch_size=batch_size, device=device,
                                       model_spec=model_spec)
        self.source = self.scorer.source
        layout = getattr(self.scorer.model.config, LAYOUT_KEY, None)
        if layout != LAYOUT:
            found = f"layout {layout!r}" if layout else f"no {LAYOUT_KEY} in its config"
            raise StarpoError(
                f"judge pairwise_rm: {self.source} is not a pairwise model of this starpo "
                f"({found}; expected {LAYOUT!r}); point judge.path at a `type: pairwise_rm` "
                f"stage (or its model/ directory), or use judge type reward_model for a "
                f"reward model")

    def logits(self, prompts: Sequence[Prompt], first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        """Raw logits of P(first is better), in the order presented."""
        _check_lengths(prompts, first)
        _check_lengths(prompts, second)
        return self.scorer.score(list(prompts),
                                 [pair_response(a, b) for a, b in zip(first, second)])

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        return [_sigmoid(z) for z in self.logits(prompts, first, second)]
