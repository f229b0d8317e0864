"""The judge interface: ``score(prompts, responses)`` (pointwise judges) and
``rank(prompt, candidates)`` (every judge; higher is better, online DPO takes the best and
the worst). A prompt is a string (one user turn) or a list of chat messages."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from starpo.errors import StarpoError

Prompt = Union[str, list]
Comparator = Callable[[Prompt, str, str], float]



@runtime_checkable
class Judge(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair; higher is better."""
        ...

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        """One score per candidate of the same prompt; higher is better."""
        ...


class PointwiseJudge:
    """Base of judges that score each response on its own; ranking is scoring."""

    pointwise = True     # read by starpo.judge_kinds.is_pointwise (the eval stage needs it)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        return self.score([prompt] * len(candidates), list(candidates))

    def rank_many(self, prompts: Sequence[Prompt],
                  groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """``rank`` for many prompts at once: one flattened ``score`` call."""
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        flat_r = [r for g in groups for r in g]
        flat = self.score(flat_p, flat_r)
        out, k = [], 0
        for g in groups:
            out.append(flat[k: k + len(g)])
            k += len(g)
        return out


def rank_groups(judge: Judge, prompts: Sequence[Prompt],
                groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Scores of each prompt's candidates (higher is better), batched when possible."""
    if len(prompts) != len(groups):
        raise ValueError("rank_groups: one candidate group per prompt")
    many = getattr(judge, "rank_many", None)
    if many is not None:
        return many(prompts, groups)
    return [judge.rank(p, list(g)) for p, g in zip(prompts, groups)]


def _check_lengths(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")



Comparator = Callable[[Prompt, str, str], float]


class PairwiseJudge:
    """A judge that compares two responses: ``compare(prompt, a, b)`` = P(a is better).

    Judges that compare are often biased toward one position. With ``both_orders`` (the
    default) every comparison is made as (a, b) and as (b, a) and the two are averaged:
    ``(p(a, b) + 1 - p(b, a)) / 2``, so ``compare(p, a, b) + compare(p, b, a) == 1``.

    ``rank`` plays a round robin: a candidate's score is its mean probability of beating
    each other candidate (in [0, 1], higher is better).

    Give a ``comparator(prompt, first, second) -> probability first is better``, or
    subclass and override :meth:`prefer` (batched, as presented, no order control).
    A pairwise judge has no absolute scale, so :meth:`score` is an error.
    """

    name = "pairwise"
    pointwise = False    # read by starpo.judge_kinds.is_pointwise: it only compares

    def __init__(self, comparator: Comparator | None = None, *, both_orders: bool = True):
        self.comparator, self.both_orders = comparator, both_orders

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        """Raw P(first is better) for each triple, in the order presented."""
        if self.comparator is None:
            raise NotImplementedError("PairwiseJudge needs a comparator or a prefer() override")
        return [float(self.comparator(p, a, b)) for p, a, b in zip(prompts, first, second)]

    def compare_batch(self, prompts: Sequence[Prompt], a: Sequence[str],
                      b: Sequence[str]) -> list[float]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("compare_batch: prompts, a and b must have the same length")
        if not self.both_orders:
            return self.prefer(prompts, a, b)
        # one call over both orders, so a batched judge runs them together
        raw = self.prefer(list(prompts) * 2, list(a) + list(b), list(b) + list(a))
        n = len(prompts)
        return [(raw[i] + 1.0 - raw[n + i]) / 2.0 for i in range(n)]

    def compare(self, prompt: Prompt, a: str, b: str) -> float:
        return self.compare_batch([prompt], [a], [b])[0]

    def rank(self, prompt: Prompt, candidates: Sequence[str]) -> list[float]:
        return self.rank_many([prompt], [candidates])[0]

    def rank_many(self, prompts: Sequence[Prompt],
                  groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """``rank`` for many prompts at once: every game of every group in one
        ``compare_batch`` call (so a batched judge runs them together)."""
        games = [(g, i, j) for g, cands in enumerate(groups)
                 for i in range(len(cands)) for j in range(i + 1, len(cands))]
        ps = [prompts[g] for g, _, _ in games]
        firsts = [groups[g][i] for g, i, _ in games]
        seconds = [groups[g][j] for g, _, j in games]
        probs = self.compare_batch(ps, firsts, seconds) if games else []
        # without order control, j's chance is what the judge says with j shown first
        back = self.compare_batch(ps, seconds, firsts) if games and not self.both_orders \
            else None
        wins = [[0.0] * len(c) for c in groups]
        for n, (g, i, j) in enumerate(games):
            wins[g][i] += probs[n]
            wins[g][j] += back[n] if back is not None else 1.0 - probs[n]
        return [[w / (len(c) - 1) for w in ws] if len(c) >= 2 else [0.5] * len(c)
                for ws, c in zip(wins, groups)]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise StarpoError("a pairwise judge compares responses and has no absolute score; "
                          "use a reward_model or gold judge where scores are needed")
