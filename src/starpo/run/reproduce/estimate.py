"""Numbers across seeds and the verdicts drawn from them.

Every figure of the reproduction study is a mean over seeds with a 95% interval:

* two or more seeds: a Student-t interval over the per-seed values (each seed's value is
  one training run's evaluation, so the interval covers training randomness and the
  prompt sample alike);
* one seed (``--mini``): the run's own bootstrap interval over prompts when it has one.

A claim is checked on a *difference* (ours minus the alternative, paired by seed): it
reproduces when the whole interval lies on the side the paper reports, does not
reproduce when it lies on the other side, and is inconclusive when it contains 0. With
one seed the difference's interval is the conservative ``[a_lo - b_hi, a_hi - b_lo]``
of the two runs' intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: normal)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

REPRODUCES = "reproduces"
OPPOSITE = "does not reproduce"
INCONCLUSIVE = "inconclusive"


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: df={df} must be at least 1")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds and its 95% interval (``lo``/``hi`` ``None``: unknown)."""

    mean: float | None
    lo: float | None = None
    hi: float | None = None
    n: int = 0

    @property
    def known(self) -> bool:
        return _finite(self.mean)

    @property
    def has_interval(self) -> bool:
        return _finite(self.lo) and _finite(self.hi)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


MISSING = Estimate(None)


def across_seeds(values: Sequence[Any], cis: Sequence[Any] | None = None) -> Estimate:
    """Mean of the finite per-seed ``values`` with its 95% interval (module docstring);
    ``cis`` are the per-seed intervals ``[lo, hi]``, used when there is one seed."""
    pairs = [(float(v), (cis[i] if cis is not None and i < len(cis) else None))
             for i, v in enumerate(values) if _finite(v)]
    if not pairs:
        return MISSING
    xs = [v for v, _ in pairs]
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        ci = pairs[0][1]
        if ci is not None and len(ci) == 2 and all(_finite(c) for c in ci):
            return Estimate(mean, float(ci[0]), float(ci[1]), 1)
        return Estimate(mean, None, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def difference(a: Sequence[Any], b: Sequence[Any], a_cis: Sequence[Any] | None = None,
               b_cis: Sequence[Any] | None = None) -> Estimate:
    """``a − b`` paired by seed (seeds where either is missing are left out)."""
    keep = [i for i in range(min(len(a), len(b))) if _finite(a[i]) and _finite(b[i])]
    if not keep:
        return MISSING
    if len(keep) >= 2:
        return across_seeds([float(a[i]) - float(b[i]) for i in keep])
    i = keep[0]
    d = float(a[i]) - float(b[i])
    ca = a_cis[i] if a_cis is not None and i < len(a_cis) else None
    cb = b_cis[i] if b_cis is not None and i < len(b_cis) else None
    if ca and cb and all(_finite(c) for c in (*ca, *cb)):
        return Estimate(d, float(ca[0]) - float(cb[1]), float(ca[1]) - float(cb[0]), 1)
    return Estimate(d, None, None, 1)


def verdict(diff: Estimate, direction: int = 1) -> str:
    """Whether a difference has the sign a paper reports (``direction`` +1: ours is
    higher, −1: lower): :data:`REPRODUCES`, :data:`OPPOSITE` or :data:`INCONCLUSIVE`."""
    if direction not in (1, -1):
        raise ValueError(f"verdict: direction must be +1 or -1, not {direction}")
    if not diff.has_interval:
        return INCONCLUSIVE
    lo, hi = diff.lo * direction, diff.hi * direction
    if direction < 0:
        lo, hi = hi, lo
    if lo > 0:
        return REPRODUCES
    if hi < 0:
        return OPPOSITE
    return INCONCLUSIVE


def fmt(e: Estimate, digits: int = 3) -> str:
    """``-0.123 [-0.150, -0.096]``; ``—`` when unknown; the interval left out when
    there is none."""
    if not e.known:
        return "—"
    if not e.has_interval:
        return f"{e.mean:.{digits}f}"
    return f"{e.mean:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def wilson(k: int, n: int) -> Estimate:
    """A share ``k / n`` with its 95% Wilson score interval (sound for small ``n`` and for
    shares near 0 or 1, where a normal interval is not)."""
    if n <= 0:
        return MISSING
    z = 1.959964
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, center - half), min(1.0, center + half), n)
