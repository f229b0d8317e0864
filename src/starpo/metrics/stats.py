"""The guide's statistics: win rates with ties, KL terms, bootstrap intervals, length
quantiles, paired score gaps (the metrics built from them are the entries of
:mod:`starpo.metrics.registry`; their definitions in words: :mod:`starpo.metrics.evaluation`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np


# Judge scores tie only when equal: the judges score each text deterministically, and the
# one source of round-off (batching the same text differently) is covered by ``same``.
SCORE_TIE = 0.0


def win_outcomes(a: Sequence[float], b: Sequence[float], *, same: Sequence[bool] | None = None,
                 tol: float = SCORE_TIE) -> np.ndarray:
    """Per-pair outcome of ``a`` against ``b``: 1.0 win, 0.5 tie, 0.0 loss.

    A tie is ``|a − b| <= tol``, or ``same[i]`` true (the two responses are the same text:
    a judge that batches inputs can give the same text scores that differ by float
    round-off, and the same text must not win against itself).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_outcomes: {a.shape} vs {b.shape}")
    tie = np.abs(a - b) <= tol
    if same is not None:
        tie |= np.asarray(same, dtype=bool)
    return np.where(tie, 0.5, np.where(a > b, 1.0, 0.0))


def win_rate(a: Sequence[float], b: Sequence[float], *, same: Sequence[bool] | None = None,
             tol: float = SCORE_TIE) -> tuple[float, float]:
    """``(win rate with ties counted ½, tie rate)`` of scores ``a`` against ``b``."""
    w = win_outcomes(a, b, same=same, tol=tol)
    if w.size == 0:
        return float("nan"), float("nan")
    return float(w.mean()), float((w == 0.5).mean())


def kl_terms(logp_policy: Sequence[float], logp_ref: Sequence[float]) -> np.ndarray:
    """Per-sample ``Σ_t log π − Σ_t log π_ref`` from per-sequence summed log-probs."""
    p = np.asarray(logp_policy, dtype=np.float64)
    r = np.asarray(logp_ref, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"kl_terms: {p.shape} vs {r.shape}")
    return p - r


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampled indices (with replacement), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, indices: np.ndarray | None = None
                 ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values``.

    ``indices`` (from :func:`bootstrap_indices`) may be given to share resamples between
    metrics; otherwise they are drawn from ``seed``. ``None`` when ``n_boot`` is 0 or
    there are no values.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or (indices is None and n_boot <= 0):
        return None
    if indices is None:
        indices = bootstrap_indices(v.size, n_boot, seed)
    if indices.shape[1] != v.size:
        raise ValueError("bootstrap_ci: indices were drawn for a different number of values")
    means = np.empty(indices.shape[0])
    step = max(1, 4_000_000 // max(v.size, 1))  # bound the [chunk, n] gather's memory
    for s in range(0, indices.shape[0], step):
        means[s:s + step] = v[indices[s:s + step]].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def length_quantiles(lengths: Sequence[int]) -> dict[str, float]:
    """min, p10, p25, median, p75, p90, max of response lengths (empty dict for none)."""
    v = np.asarray(lengths, dtype=np.float64)
    if v.size == 0:
        return {}
    qs = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"min": float(v.min()), "p10": float(qs[0]), "p25": float(qs[1]),
            "median": float(qs[2]), "p75": float(qs[3]), "p90": float(qs[4]),
            "max": float(v.max())}


def _finite_or_none(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def mean_interval(values: np.ndarray, indices: np.ndarray | None
                  ) -> tuple[float | None, list[float | None] | None]:
    """The mean of per-prompt ``values`` and its percentile bootstrap 95% interval over the
    resamples ``indices`` (``[n_boot, len(values)]``; ``None``: no interval). Non-finite
    results are ``None`` (JSON has no NaN). How a metric's per-prompt values become its
    summary value unless its registry entry says otherwise."""
    value = _finite_or_none(float(values.mean()))
    ci = bootstrap_ci(values, indices=indices) if indices is not None else None
    return value, None if ci is None else [_finite_or_none(ci[0]), _finite_or_none(ci[1])]


def gap_pairs(names: Sequence[str], reference: str | None = None) -> list[tuple[str, str]]:
    """Which paired score gaps an evaluation reports, as ``(model, baseline)`` pairs: each
    model against the one before it (the pipeline's stage order: dpo vs sft, online vs
    dpo), and each later model against ``reference`` (default: the first) when that pair
    is not already listed."""
    names = list(names)
    ref = reference if reference is not None else (names[0] if names else None)
    pairs = [(b, a) for a, b in zip(names, names[1:])]
    pairs += [(b, ref) for b in names if b != ref and (b, ref) not in pairs]
    return pairs


def score_gaps(scores: Mapping[str, Sequence[float]], pairs: Sequence[tuple[str, str]], *,
               n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Paired differences of mean score, with a bootstrap 95% interval over prompts.

    For each ``(model, baseline)`` pair: ``gap = mean_i (s_model[i] − s_baseline[i])``,
    where ``i`` runs over the same prompts. Pairing removes the prompt-to-prompt spread
    that the per-model intervals carry, so a gap whose interval excludes 0 is a
    difference between the models, not between easy and hard prompts; two overlapping
    per-model intervals say much less. The resamples are shared by every pair.

    Returns ``[{"model", "baseline", "n", "gap", "gap_ci": [lo, hi] | None}]``.
    """
    out: list[dict[str, Any]] = []
    idx = None
    for model, base in pairs:
        a = np.asarray(scores[model], dtype=np.float64)
        b = np.asarray(scores[base], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"score_gaps: {model} has {a.size} scores, {base} {b.size}")
        d = a - b
        if idx is None and n_boot > 0 and d.size:
            idx = bootstrap_indices(d.size, n_boot, seed)
        ci = bootstrap_ci(d, indices=idx) if idx is not None else None
        out.append({"model": model, "baseline": base, "n": int(d.size),
                    "gap": _finite_or_none(float(d.mean())) if d.size else None,
                    "gap_ci": None if ci is None else [_finite_or_none(ci[0]),
                                                       _finite_or_none(ci[1])]})
    return out


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct-n of a set of responses: distinct word n-grams over all word n-grams
    (whitespace words, lower-cased), pooled over ``texts``. Near 0 means degenerate,
    repeated text; ordinary prose is well above 0.5 for n = 2. ``None`` when the texts hold
    no n-gram at all."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        w = t.lower().split()
        grams.extend(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return len(set(grams)) / len(grams) if grams else None
