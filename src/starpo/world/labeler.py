"""The simulated annotator that labels the world's preference pairs: it agrees with the
gold reward only partly (a length bias, then label noise)."""

from __future__ import annotations

import math
import random

from starpo.world.gold import gold_reward
from starpo.world.templates import _as_text

LABEL_GOLD_WEIGHT = 4.0     # logit per unit of gold difference
LABEL_LENGTH_WEIGHT = 0.08  # logit per extra word: the length bias
LABEL_FLIP = 0.12           # probability the annotator's choice is flipped afterwards


def label_pair(prompt: str, a: str, b: str, rng: random.Random, *,
               gold_a: float | None = None, gold_b: float | None = None) -> bool:
    """The simulated annotator: ``True`` when it prefers ``a`` over ``b``.

    ``P(a) = sigmoid(4 * (gold_a - gold_b) + 0.08 * (words_a - words_b))``, then the choice
    is flipped with probability 0.12. ``rng`` is anything with a ``random()`` method.
    """
    if gold_a is None:
        gold_a = gold_reward(prompt, a)
    if gold_b is None:
        gold_b = gold_reward(prompt, b)
    z = (LABEL_GOLD_WEIGHT * (gold_a - gold_b)
         + LABEL_LENGTH_WEIGHT * (len(_as_text(a).split()) - len(_as_text(b).split())))
    z = max(-50.0, min(50.0, z))
    pick_a = rng.random() < 1.0 / (1.0 + math.exp(-z))
    if rng.random() < LABEL_FLIP:
        pick_a = not pick_a
    return pick_a
