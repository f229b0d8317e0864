"""The evaluation's metrics, one entry each: the one place a metric is defined.

An entry says everything the rest of starpo needs to know about a metric:

* ``name``: its key in ``eval/summary.json`` (with ``<name>_ci``, its 95% interval);
* ``header`` and ``label``: its column header in the report tables and its longer label
  on chart axes;
* ``higher_is_better``: True for a goal a method wants high (the report marks the best
  value; a sweep that records it may rank runs by it, ``analysis.metric``); False for a
  metric that describes a model (KL, length) without a better direction;
* how it ties and compares: ``tie`` names the summary key of the share of ties of a win
  rate (its per-prompt outcomes equal to ½); ``against_sft`` says the metric compares a
  model with the SFT reference, whose own value is trivial (½, 0) and never "best";
* how its per-prompt values become a summary value: ``per_prompt`` gives one value per
  prompt from a model's :class:`ModelValues` (``None`` when its inputs are missing: the
  metric is then ``None``), and ``aggregate`` turns them and the bootstrap resamples into
  the value and its interval (default: the mean, percentile bootstrap interval);
* ``details``: further summary keys written right after it (counts, quantiles);
* ``record``: the field of the per-prompt records (``<model>.jsonl``) holding its
  per-prompt values, from which the per-category table aggregates it (``None``: not in
  that table);
* ``sweep``: recorded for every sweep trial (``trials.jsonl``), analysed over a sweep's
  grid and shown on its page (the documented contract metrics; ``finished_rate`` is not);
* ``percent``: shown as a percentage; ``description``: the report's one-phrase
  explanation under the metrics table.

Adding a metric is one entry in :data:`METRICS` (the order is ``summary.json``'s; add
new ones at the end, so existing summaries keep their layout). The eval summary
(:func:`summarize_model`), the per-category table (:func:`by_category`), the run page, the
sweep analysis and the sweep page read this tuple when they run; the sweep's trial record
and the constants of :mod:`starpo.metrics.names` take the names from it at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from starpo.errors import StarpoError
from starpo.metrics.stats import (bootstrap_indices, length_quantiles, mean_interval,
                                  win_outcomes)


@dataclass(frozen=True)
class ModelValues:
    """One model's per-prompt evaluation inputs (``n`` prompts, the same order for all).

    ``chosen_scores[i]`` is ``None`` where prompt ``i`` has no reference response;
    ``same_as_*`` mark responses with the same text as the one compared with (a tie
    whatever the judge's round-off); ``kl`` is the per-prompt ``Σ_t log π − log π_sft``.
    Fields other than ``scores``, ``lengths`` and ``n_tokens`` are ``None`` when not
    measured.
    """
    scores: np.ndarray                                 # [n] judge scores
    lengths: np.ndarray                                # [n] response tokens, no end of turn
    n_tokens: np.ndarray                               # [n] sampled tokens, end of turn included
    finished: np.ndarray | None = None                 # [n] bool: ended the turn
    chosen_scores: Sequence[float | None] | None = None
    same_as_chosen: np.ndarray | None = None           # [n] bool
    sft_scores: np.ndarray | None = None               # [n]
    same_as_sft: np.ndarray | None = None              # [n] bool
    kl: np.ndarray | None = None                       # [n] nats per response


PerPrompt = Callable[[ModelValues], "np.ndarray | None"]
Aggregate = Callable[[np.ndarray, "np.ndarray | None"],
                     "tuple[float | None, list[float | None] | None]"]


@dataclass(frozen=True)
class Metric:
    """One evaluation metric (its fields are explained in the module docstring)."""
    name: str
    header: str
    per_prompt: PerPrompt
    higher_is_better: bool = False
    label: str | None = None                  # chart axes; default: the header
    tie: str | None = None
    against_sft: bool = False
    aggregate: Aggregate = mean_interval
    details: Callable[[ModelValues], dict[str, Any]] | None = None
    record: str | None = None
    sweep: bool = True
    percent: bool = False
    description: str = ""

    @property
    def axis_label(self) -> str:
        return self.label or self.header


# --------------------------------------------------------------------------- per prompt


def _has_chosen(v: ModelValues) -> np.ndarray:
    return np.array([c is not None for c in v.chosen_scores], dtype=bool)


def _win_vs_chosen(v: ModelValues) -> np.ndarray | None:
    """Outcomes against the dataset's reference response, on the prompts that have one."""
    if v.chosen_scores is None:
        return None
    has = _has_chosen(v)
    chosen = np.array([c for c in v.chosen_scores if c is not None], dtype=np.float64)
    same = None if v.same_as_chosen is None else np.asarray(v.same_as_chosen, bool)[has]
    return win_outcomes(v.scores[has], chosen, same=same)


def _n_chosen(v: ModelValues) -> dict[str, Any]:
    return {} if v.chosen_scores is None else {"n_chosen": int(_has_chosen(v).sum())}


def _win_vs_sft(v: ModelValues) -> np.ndarray | None:
    if v.sft_scores is None:
        return None
    return win_outcomes(v.scores, v.sft_scores, same=v.same_as_sft)


def _kl_per_token(v: ModelValues) -> np.ndarray | None:
    if v.kl is None:
        return None
    return v.kl / np.maximum(np.asarray(v.n_tokens, dtype=np.float64), 1.0)


def _finished(v: ModelValues) -> np.ndarray | None:
    return None if v.finished is None else np.asarray(v.finished, dtype=np.float64)


# --------------------------------------------------------------------------- the registry


METRICS: tuple[Metric, ...] = (
    Metric("mean_score", "mean score", lambda v: v.scores, higher_is_better=True,
           label="mean gold score", record="score"),
    Metric("win_vs_chosen", "win vs chosen", _win_vs_chosen, higher_is_better=True,
           label="win rate vs chosen", tie="tie_vs_chosen", details=_n_chosen,
           record="win_vs_chosen", description="win rates count ties as ½"),
    Metric("win_vs_sft", "win vs SFT", _win_vs_sft, higher_is_better=True,
           label="win rate vs SFT", tie="tie_vs_sft", against_sft=True, record="win_vs_sft",
           description="win rates count ties as ½"),
    Metric("kl_vs_sft", "KL vs SFT", lambda v: v.kl, label="KL to SFT (nats)",
           against_sft=True, record="kl",
           description="KL = Σₜ [log π − log π_sft] over the model's own sampled tokens "
                       "(end of turn included)"),
    Metric("kl_vs_sft_per_token", "KL / token", _kl_per_token,
           label="KL to SFT per token (nats)", against_sft=True,
           description="KL / token divides by those tokens"),
    Metric("mean_length", "mean length", lambda v: v.lengths, label="mean length (tokens)",
           details=lambda v: {"length_quantiles": length_quantiles(v.lengths)},
           record="length",
           description="length = response tokens without the end-of-turn token"),
    Metric("finished_rate", "finished", _finished, label="share of finished responses",
           record="finished", sweep=False, percent=True,
           description="finished = share of responses that ended their turn (the rest "
                       "hit max_new_tokens)"),
)


def get(name: str) -> Metric:
    """The metric named ``name``."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KeyError(f"no metric {name!r} (metrics: {', '.join(m.name for m in METRICS)})")


def sweep_metrics() -> tuple[Metric, ...]:
    """The metrics a sweep records per trial and analyses (the documented contract), read
    when called, so an entry added to :data:`METRICS` is seen everywhere."""
    return tuple(m for m in METRICS if m.sweep)


def sweep_names() -> tuple[str, ...]:
    """The names of :func:`sweep_metrics`."""
    return tuple(m.name for m in sweep_metrics())


def headline_names() -> tuple[str, ...]:
    """The metrics a method wants high: what "best" may mean in a sweep's analysis."""
    return tuple(m.name for m in sweep_metrics() if m.higher_is_better)


# --------------------------------------------------------------------------- applying it


def summarize_model(scores: Sequence[float], lengths: Sequence[int], n_tokens: Sequence[int], *,
                    finished: Sequence[bool] | None = None,
                    chosen_scores: Sequence[float | None] | None = None,
                    same_as_chosen: Sequence[bool] | None = None,
                    sft_scores: Sequence[float] | None = None,
                    same_as_sft: Sequence[bool] | None = None,
                    kl: Sequence[float] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every metric of :data:`METRICS` for one model from its per-prompt values (what
    ``summary.json`` holds for it): ``{"n": prompts, name: value, name_ci: [lo, hi], ...}``
    in the registry's order, a win rate followed by its tie share, each metric by its
    ``details``.

    One set of ``n_boot`` resamples of the prompts (from ``seed``) serves every metric
    over all prompts; a metric over a subset (``win_vs_chosen``: prompts with a
    reference) draws its own from the same seed. A metric whose inputs are missing is
    ``None``, and so is one with no prompt.
    """
    v = ModelValues(
        scores=np.asarray(scores, dtype=np.float64),
        lengths=np.asarray(lengths, dtype=np.float64),
        n_tokens=np.asarray(n_tokens, dtype=np.float64),
        finished=None if finished is None else np.asarray(finished, dtype=bool),
        chosen_scores=None if chosen_scores is None else list(chosen_scores),
        same_as_chosen=None if same_as_chosen is None else np.asarray(same_as_chosen, bool),
        sft_scores=None if sft_scores is None else np.asarray(sft_scores, dtype=np.float64),
        same_as_sft=None if same_as_sft is None else np.asarray(same_as_sft, bool),
        kl=None if kl is None else np.asarray(kl, dtype=np.float64))
    n = v.scores.size
    if n == 0:
        raise StarpoError("evaluation: no prompt to evaluate")
    idx = bootstrap_indices(n, n_boot, seed) if n_boot > 0 else None

    out: dict[str, Any] = {"n": n}

    def put(name: str, per_prompt: np.ndarray | None, aggregate: Aggregate) -> None:
        if per_prompt is None or per_prompt.size == 0:
            out[name], out[f"{name}_ci"] = None, None
            return
        sub = idx
        if sub is not None and per_prompt.size != n:  # a subset of prompts: its own resamples
            sub = bootstrap_indices(per_prompt.size, n_boot, seed)
        out[name], out[f"{name}_ci"] = aggregate(per_prompt, sub)

    for m in METRICS:
        values = m.per_prompt(v)
        put(m.name, values, m.aggregate)
        if m.tie is not None:
            put(m.tie, None if values is None else (values == 0.5).astype(np.float64),
                m.aggregate)
        if m.details is not None:
            out.update(m.details(v))
    return out


def by_category(records: Sequence[Mapping[str, Any]], *, n_boot: int = 1000, seed: int = 0
                ) -> dict[str, dict[str, Any]]:
    """One model's metrics per prompt category (MT-Bench's writing, math, …) from its
    per-prompt evaluation records: ``{category: {"n": k, metric: value, metric_ci: [lo,
    hi]}}`` for every metric with a ``record`` field, each aggregated over that category's
    prompts where the record has a value (its own resamples, from ``seed``). Records
    without a ``category`` are left out; no categories gives ``{}``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        c = r.get("category")
        if c is not None:
            groups.setdefault(str(c), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for cat in sorted(groups):
        recs = groups[cat]
        row: dict[str, Any] = {"n": len(recs)}
        for m in METRICS:
            if m.record is None:
                continue
            vals = np.array([float(r[m.record]) for r in recs if r.get(m.record) is not None],
                            dtype=np.float64)
            if vals.size == 0:
                row[m.name], row[f"{m.name}_ci"] = None, None
                continue
            idx = bootstrap_indices(vals.size, n_boot, seed) if n_boot > 0 else None
            row[m.name], row[f"{m.name}_ci"] = m.aggregate(vals, idx)
        out[cat] = row
    return out
