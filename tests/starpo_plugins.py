"""A loss, an online pair rule and a judge defined outside starpo, as a user's package would
(used by tests/run/test_extensions.py through recipe import paths ``starpo_plugins:...``)."""

from __future__ import annotations

import torch

from starpo.judges.base import PointwiseJudge
from starpo.losses import declare


@declare(needs_reference=True)
def hinge(pc, pr, rc, rr, *, beta):
    """SLiC-style hinge on the DPO log-ratio margin: ``max(0, 1 − β·h)``, h = (pc−rc)−(pr−rr).
    At the first step (policy = reference) every loss is exactly 1."""
    h = (pc - rc) - (pr - rr)
    return torch.relu(1.0 - beta * h), (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def top_two(scores, *, rng, tie_tolerance):
    """Best and (with three candidates or more) second best, each against the worst."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(order[0], order[-1])] + ([(order[1], order[-1])] if len(order) > 2 else [])


def undeclared(pc, pr, *, beta):
    return pc - pr, pc, pr


class WordCountJudge(PointwiseJudge):
    """Prefers responses of ``target`` words: score = −|words − target|."""

    name = "word-count"

    def __init__(self, target: int = 8):
        self.target = target

    def score(self, prompts, responses):
        return [-abs(len(r.split()) - self.target) for r in responses]
