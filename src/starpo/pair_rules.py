"""Pair rules of the online stage: which of a prompt's judged samples become its (chosen,
rejected) pair. One registry, like the losses': a recipe's ``pair_selection`` names a
built-in rule or an importable ``module:function``.

A rule sees one prompt's *candidates* — its distinct sample texts that got a finite judge
score, in sample order — as their scores, and returns positions into that list::

    rule(scores: list[float], *, rng: random.Random, tie_tolerance: float)
        -> (chosen, rejected) | [(chosen, rejected), ...] | None

A list gives several pairs for the prompt; ``None`` (or ``[]``) gives none. ``rng`` is the
prompt's own random stream (seeded by the round and the prompt's position, so one prompt's
draws never depend on another's). The online stage drops a pair whose chosen score is not
above the rejected one by more than ``tie_tolerance`` (the judge expressed no preference),
and prompts with fewer than two candidates never reach a rule. ``samples.jsonl`` and
``pairs.jsonl`` record the rule that chose each pair.

Built-in rules (``best`` is the highest score, the earliest sample on a tie):

``best_worst``      best vs the lowest score (the LIONs recipe)
``best_random``     best vs a candidate drawn uniformly among those scored below it
``mean_minus_2sd``  best vs the candidate closest to μ − 2σ of the prompt's candidate scores
                    (population σ): a clearly worse but not outlying response, which held
                    up better than best-vs-worst as samples per prompt grow
                    (arXiv 2502.16825)
``random``          two candidates drawn uniformly, the higher-scored one chosen (a
                    baseline: random pairs did about as well as careful selection in some
                    settings, arXiv 2604.02766)

Your own rule, named in a recipe as ``pair_selection: mypkg.rules:top2``::

    def top2(scores, *, rng, tie_tolerance):
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(order[0], order[-1]), (order[1], order[-1])]    # two pairs per prompt

This module imports no torch: the recipe validates rule names through it.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from starpo import extensions
from starpo.errors import RecipeError

Pair = tuple[int, int]


def _best(scores: Sequence[float]) -> int:
    return min(range(len(scores)), key=lambda i: (-scores[i], i))


def best_worst(scores: Sequence[float], *, rng: random.Random, tie_tolerance: float) -> Pair:
    best = _best(scores)
    worst = min((i for i in range(len(scores)) if i != best), key=lambda i: (scores[i], i))
    return best, worst


def best_random(scores: Sequence[float], *, rng: random.Random,
                tie_tolerance: float) -> Pair | None:
    best = _best(scores)
    lower = [i for i in range(len(scores)) if scores[best] - scores[i] > tie_tolerance]
    return (best, rng.choice(lower)) if lower else None


def mean_minus_2sd(scores: Sequence[float], *, rng: random.Random,
                   tie_tolerance: float) -> Pair:
    best = _best(scores)
    mean = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    target = mean - 2 * sd
    rejected = min((i for i in range(len(scores)) if i != best),
                   key=lambda i: (abs(scores[i] - target), i))
    return best, rejected


def random_pair(scores: Sequence[float], *, rng: random.Random, tie_tolerance: float) -> Pair:
    a, b = rng.sample(range(len(scores)), 2)
    return (a, b) if (scores[a], -a) >= (scores[b], -b) else (b, a)


BUILTIN: dict[str, Callable] = {"best_worst": best_worst, "best_random": best_random,
                                "mean_minus_2sd": mean_minus_2sd, "random": random_pair}


def get(name: str) -> Callable:
    """The rule named ``name``: a built-in, or an importable ``module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not extensions.is_import_path(name):
        raise RecipeError(f"unknown pair_selection {name!r}; expected one of "
                          f"{', '.join(BUILTIN)} or an importable module:function")
    fn = extensions.load(name, "pair_selection")
    if not callable(fn):
        raise RecipeError(f"pair_selection {name!r} is not a function")
    return fn


def check_name(name: str) -> str:
    """Recipe-time check: a built-in name, or an import path that resolves."""
    get(name)
    return name


def pairs_of(name: str, scores: Sequence[float], *, rng: random.Random,
             tie_tolerance: float) -> list[Pair]:
    """The pairs rule ``name`` picks from ``scores`` (at least two candidates), checked:
    positions in range and distinct, each pair's margin above ``tie_tolerance`` (pairs at
    or below it are left out)."""
    got = get(name)(list(scores), rng=rng, tie_tolerance=tie_tolerance)
    if got is None:
        return []
    pairs = [got] if isinstance(got, tuple) else list(got)
    out = []
    for pair in pairs:
        c, r = (int(x) for x in pair)
        if not (0 <= c < len(scores) and 0 <= r < len(scores)) or c == r:
            raise ValueError(f"pair_selection {name!r} returned {pair!r} for {len(scores)} "
                             "candidates: (chosen, rejected) must be two distinct positions")
        if scores[c] - scores[r] > tie_tolerance:
            out.append((c, r))
    return out
