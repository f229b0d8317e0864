"""The guide's per-model statistics: win rates with ties, KL terms, bootstrap intervals,
length quantiles, and the summary of one model (the metric definitions are in
:mod:`starpo.metrics.evaluation`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from starpo.errors import StarpoError


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


def summarize_model(scores: Sequence[float], lengths: Sequence[int], n_tokens: Sequence[int], *,
                    finished: Sequence[bool] | None = None,
                    chosen_scores: Sequence[float | None] | None = None,
                    same_as_chosen: Sequence[bool] | None = None,
                    sft_scores: Sequence[float] | None = None,
                    same_as_sft: Sequence[bool] | None = None,
                    kl: Sequence[float] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All metrics of one model from its per-prompt values (see the module docstring).

    Prompts whose ``chosen_scores`` entry is ``None`` (no reference response) are left
    out of ``win_vs_chosen``; a metric whose inputs are missing is ``None``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        raise StarpoError("evaluation: no prompt to evaluate")
    idx = bootstrap_indices(n, n_boot, seed) if n_boot > 0 else None

    out: dict[str, Any] = {"n": n}

    def put(name: str, per_prompt: np.ndarray | None):
        if per_prompt is None or per_prompt.size == 0:
            out[name], out[f"{name}_ci"] = None, None
            return
        out[name] = _finite_or_none(float(per_prompt.mean()))
        sub = idx
        if sub is not None and per_prompt.size != n:  # a subset of prompts: its own resamples
            sub = bootstrap_indices(per_prompt.size, n_boot, seed)
        ci = bootstrap_ci(per_prompt, indices=sub) if sub is not None else None
        out[f"{name}_ci"] = None if ci is None else [_finite_or_none(ci[0]),
                                                     _finite_or_none(ci[1])]

    put("mean_score", scores)

    if chosen_scores is not None:
        has = np.array([c is not None for c in chosen_scores], dtype=bool)
        if has.any():
            ch = np.array([c for c in chosen_scores if c is not None], dtype=np.float64)
            same = None if same_as_chosen is None else np.asarray(same_as_chosen, bool)[has]
            w = win_outcomes(scores[has], ch, same=same)
            put("win_vs_chosen", w)
            put("tie_vs_chosen", (w == 0.5).astype(np.float64))
            out["n_chosen"] = int(has.sum())
        else:
            put("win_vs_chosen", None)
            put("tie_vs_chosen", None)
            out["n_chosen"] = 0
    else:
        put("win_vs_chosen", None)
        put("tie_vs_chosen", None)

    if sft_scores is not None:
        w = win_outcomes(scores, sft_scores, same=same_as_sft)
        put("win_vs_sft", w)
        put("tie_vs_sft", (w == 0.5).astype(np.float64))
    else:
        put("win_vs_sft", None)
        put("tie_vs_sft", None)

    n_tok = np.asarray(n_tokens, dtype=np.float64)
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)
        put("kl_vs_sft", kl)
        put("kl_vs_sft_per_token", kl / np.maximum(n_tok, 1.0))
    else:
        put("kl_vs_sft", None)
        put("kl_vs_sft_per_token", None)

    lengths_a = np.asarray(lengths, dtype=np.float64)
    put("mean_length", lengths_a)
    out["length_quantiles"] = length_quantiles(lengths)
    if finished is not None:
        put("finished_rate", np.asarray(finished, dtype=np.float64))
    return out


# per-prompt record field → the metric it averages to (evaluation records, <model>.jsonl)
CATEGORY_FIELDS = (("score", "mean_score"), ("win_vs_chosen", "win_vs_chosen"),
                   ("win_vs_sft", "win_vs_sft"), ("kl", "kl_vs_sft"),
                   ("length", "mean_length"), ("finished", "finished_rate"))


def by_category(records: Sequence[Mapping[str, Any]], *, n_boot: int = 1000, seed: int = 0
                ) -> dict[str, dict[str, Any]]:
    """One model's metrics per prompt category (MT-Bench's writing, math, …) from its
    per-prompt evaluation records: ``{category: {"n": k, metric: mean, metric_ci: [lo,
    hi]}}`` for the metrics of :data:`CATEGORY_FIELDS`, each the mean over that category's
    prompts where the record has a value, with a percentile bootstrap interval. Records
    without a ``category`` are left out; no categories gives ``{}``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        c = r.get("category")
        if c is not None:
            groups.setdefault(str(c), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for cat in sorted(groups):
        recs = groups[cat]
        m: dict[str, Any] = {"n": len(recs)}
        for field, name in CATEGORY_FIELDS:
            vals = np.array([float(r[field]) for r in recs if r.get(field) is not None],
                            dtype=np.float64)
            if vals.size == 0:
                m[name], m[f"{name}_ci"] = None, None
                continue
            m[name] = _finite_or_none(float(vals.mean()))
            ci = bootstrap_ci(vals, n_boot=n_boot, seed=seed) if n_boot > 0 else None
            m[f"{name}_ci"] = None if ci is None else [_finite_or_none(ci[0]),
                                                       _finite_or_none(ci[1])]
        out[cat] = m
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
