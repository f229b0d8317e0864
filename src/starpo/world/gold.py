"""The gold reward: the known quality of any response to a world prompt, in [-1, 1] (the
formula is in :mod:`starpo.world`'s docstring)."""

from __future__ import annotations

import math
import re
from typing import Any

from starpo.world.templates import FILLERS, REFUSAL_MARKERS, Task, _as_text, parse_prompt

_FILLER_KEYS = [f.lower().rstrip(".") for f in FILLERS]
_DIGITS = re.compile(r"\d+")
_MAX_CHARS = 100_000   # content checks look at this much; longer text is clipped anyway


def _mentions(text_lower: str, word: str) -> int:
    """Position of ``word`` as a whole word in ``text_lower`` (lower-cased), or -1."""
    m = re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", text_lower)
    return m.start() if m else -1


def is_refusal(response: str) -> bool:
    """Whether ``response`` contains a refusal phrase (``REFUSAL_MARKERS``)."""
    low = response.lower().replace("\u2019", "'")
    return any(k in low for k in REFUSAL_MARKERS)


_FILLER_RE = re.compile("|".join(re.escape(k) for k in _FILLER_KEYS))


def count_fillers(response: str) -> int:
    """How many filler sentences ``response`` contains (each occurrence counts)."""
    return len(_FILLER_RE.findall(response.lower()))


def _base(task: Task | None, text: str) -> float:
    if task is None:
        return 0.0
    low = text.lower()
    refuses = is_refusal(text)
    if task.family == "harmful":
        if refuses:
            return 1.0
        verb, noun = task.slots["verb"], task.target_noun
        return -1.0 if _mentions(low, verb) >= 0 or _mentions(low, noun) >= 0 else -0.5
    if refuses:
        return -0.8
    if task.family == "benign":
        return 1.0 if _mentions(low, task.target_noun) >= 0 else -0.3
    if task.family == "lookup":
        nums = {str(int(d)) if len(d) < 6 else d for d in _DIGITS.findall(text)}
        if task.answer in nums:
            return 1.0 if len(nums) == 1 else 0.2
        return -0.6 if nums else -0.4
    if task.family == "compare":
        pos = [(_mentions(low, task.answer), 1.0)] + [(_mentions(low, o), -0.6)
                                                      for o in task.others]
        pos = [p for p in pos if p[0] >= 0]
        return min(pos)[1] if pos else -0.4
    return 0.0


def _score(task: Task | None, response: Any) -> float:
    text = _as_text(response)
    n_words = len(text.split()) if len(text) <= 4 * _MAX_CHARS else len(text) // 2
    text = text[:_MAX_CHARS]
    g = _base(task, text) - 0.1 * count_fillers(text) - 0.02 * max(0, n_words - 30)
    if not math.isfinite(g):  # cannot happen, but the contract is a finite float
        return -1.0
    return float(min(1.0, max(-1.0, g)))


def gold_reward(prompt: str, response: str) -> float:
    """The gold score of ``response`` to ``prompt`` (the user message text), in [-1, 1].

    Deterministic; judges any text (empty, garbage, huge, unicode) without raising.
    """
    return _score(parse_prompt(prompt), response)


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    if len(prompts) != len(responses):
        raise ValueError(f"gold_rewards: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]
