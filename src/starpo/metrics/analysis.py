"""Robustness analysis of a sweep, the *PO guide's "Analyses" (arXiv 2407.15229).

A sweep gives many runs of each method (one per grid point). Reporting only the best run
of each method hides how hard that run was to find, so the guide also looks at the whole
grid. Everything here is computed from the sweep's trial records (``trials.jsonl``, one
dict per trial, see :mod:`starpo.run.sweep`) and, for the per-prompt analyses, from the
per-prompt evaluation records of a few selected runs::

    best            the best run of each method (highest ``metric``, mean_score by default)
    expected        distribution of every metric over the method's whole grid: n, mean,
                    min, q25, median, q75, max (the guide's "expected performance")
    robustness      share of runs worse than the SFT baseline (``metric`` below SFT's), and
                    of runs worse or failed (a diverged run is worse than SFT too)
    head_to_head    per-prompt win rates between the methods' best runs and between their
                    75th-percentile runs (gold scores on the same prompts, ties count ½)
    top_k           the top k% runs of each method (25% by default): distribution of their
                    run-level length and KL, and of their pooled per-prompt lengths and KL
    sensitivity     per method and hyperparameter: the mean metric at each value (with
                    min, max and failures) and the spread max − min of those means

Definitions that matter for reproducing the numbers:

* Quartiles are ``numpy.quantile`` with linear interpolation (q25 of [1, 2, 3, 4] is 1.75).
* The 75th-percentile run is a real run, not an interpolated value: runs sorted by
  ``metric`` ascending, the one at index ``round(0.75 · (n − 1))`` rounded half up (nearest
  rank; with 4 runs the second best). For ``q = 1`` it is the best run.
* Top k% of n runs is the best ``ceil(k/100 · n)`` runs, at least one. Ties in ``metric``
  keep the grid's order.
* A tie in a head-to-head is equal scores or the same response text (a judge that batches
  inputs may give one text two scores that differ by round-off). Prompts are matched by
  their ``id`` (by position when ids repeat).
* Only trials with ``status == "ok"`` and a finite ``metric`` count as runs; failed trials
  appear in ``counts``, ``robustness`` and the ``failed`` count of each sensitivity value.

All functions are pure (records in, dicts out) except :func:`analyze_dir` and
:func:`write_analysis`, which read a sweep directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from starpo import fileio
from starpo.metrics import registry
from starpo.metrics.stats import win_rate

# what the top-k runs are described by (the guide: length and KL of the top runs)
TOPK_METRICS = ("mean_length", "kl_vs_sft", "kl_vs_sft_per_token")
# per-prompt fields pooled over the top-k runs
TOPK_PROMPT_FIELDS = ("length", "kl", "kl_per_token")
SENSITIVITY_METRICS = ("mean_score", "mean_length", "kl_vs_sft")

PromptLoader = Callable[[Mapping[str, Any]], list[dict] | None]


# =========================================================================== helpers


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_of(rec: Mapping[str, Any], metric: str) -> float | None:
    """``rec["metrics"][metric]`` as a float, or ``None`` when missing or not finite."""
    v = (rec.get("metrics") or {}).get(metric)
    return float(v) if _finite(v) else None


def is_ok(rec: Mapping[str, Any], metric: str = "mean_score") -> bool:
    """A trial that finished and has a finite ``metric``: it counts as a run."""
    return rec.get("status") == "ok" and metric_of(rec, metric) is not None


def latest_records(records: Iterable[Mapping[str, Any]],
                   ids: Sequence[str] | None = None) -> list[dict]:
    """The last record of every trial id (a retried trial appends a new line), in the order
    ids first appear; with ``ids``, only those trials, in that order."""
    last: dict[str, dict] = {}
    order: list[str] = []
    for r in records:
        if not isinstance(r, Mapping) or r.get("id") is None:
            continue
        i = str(r["id"])
        if i not in last:
            order.append(i)
        last[i] = dict(r)
    return [last[i] for i in (ids if ids is not None else order) if i in last]


def group_by_method(records: Iterable[Mapping[str, Any]]) -> dict[str, list[dict]]:
    """``{method: [records]}`` with methods in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r.get("method")), []).append(dict(r))
    return out


def describe(values: Iterable[Any]) -> dict[str, Any]:
    """n, mean, min, q25, median, q75, max of the finite ``values`` (``None`` when empty)."""
    v = np.asarray([float(x) for x in values if _finite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "min": None, "q25": None, "median": None, "q75": None,
                "max": None}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "mean": float(v.mean()), "min": float(v.min()),
            "q25": float(q25), "median": float(med), "q75": float(q75),
            "max": float(v.max())}


def brief(rec: Mapping[str, Any] | None) -> dict | None:
    """What the analysis keeps of a selected run: id, params and metrics."""
    if rec is None:
        return None
    return {"id": rec.get("id"), "method": rec.get("method"),
            "params": dict(rec.get("params") or {}),
            "metrics": {k: metric_of(rec, k) for k in registry.sweep_names()}}


# =========================================================================== run selection


def ranked(runs: Sequence[Mapping[str, Any]], metric: str) -> list[dict]:
    """Runs with a finite ``metric``, best first (stable: ties keep the grid's order)."""
    ok = [dict(r) for r in runs if is_ok(r, metric)]
    return sorted(ok, key=lambda r: -metric_of(r, metric))


def best_run(runs: Sequence[Mapping[str, Any]], metric: str = "mean_score") -> dict | None:
    """The run with the highest ``metric`` (the first of equals), or ``None``."""
    r = ranked(runs, metric)
    return r[0] if r else None


def percentile_run(runs: Sequence[Mapping[str, Any]], q: float,
                   metric: str = "mean_score") -> dict | None:
    """The run at quantile ``q`` of ``metric`` by nearest rank (see the module docstring)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile_run: q={q} is not in [0, 1]")
    # a stable ascending sort: equal values keep the grid's order
    asc = sorted((dict(r) for r in runs if is_ok(r, metric)), key=lambda r: metric_of(r, metric))
    if not asc:
        return None
    return asc[int(math.floor(q * (len(asc) - 1) + 0.5))]  # half up, not Python's half-even


def top_runs(runs: Sequence[Mapping[str, Any]], k_percent: float,
             metric: str = "mean_score") -> list[dict]:
    """The best ``ceil(k_percent/100 · n)`` runs (at least one when there is a run)."""
    if not 0.0 < k_percent <= 100.0:
        raise ValueError(f"top_runs: k_percent={k_percent} is not in (0, 100]")
    r = ranked(runs, metric)
    if not r:
        return []
    n = max(1, math.ceil(k_percent / 100.0 * len(r) - 1e-9))
    return r[:n]


# =========================================================================== whole-grid views


def expected_performance(runs: Sequence[Mapping[str, Any]],
                         metrics: Sequence[str] | None = None) -> dict[str, dict]:
    """``{metric: describe(values over the ok runs)}`` for one method's grid (default: the
    metrics a sweep records)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    return {m: describe(metric_of(r, m) for r in ok)
            for m in (registry.sweep_names() if metrics is None else metrics)}


def robustness(trials: Sequence[Mapping[str, Any]], baseline: float | None,
               metric: str = "mean_score") -> dict[str, Any]:
    """How many of a method's trials end below the SFT baseline.

    ``share_worse`` counts ok runs only; ``share_worse_or_failed`` counts a failed trial
    (diverged, NaN) as worse too, over all trials. Both are ``None`` without a baseline.
    """
    ok = [r for r in trials if is_ok(r, metric)]
    failed = [r for r in trials if r.get("status") != "ok"]
    out: dict[str, Any] = {"trials": len(trials), "ok": len(ok), "failed": len(failed),
                           "baseline": baseline if _finite(baseline) else None,
                           "worse": None, "share_worse": None, "share_worse_or_failed": None}
    if not _finite(baseline):
        return out
    worse = sum(1 for r in ok if metric_of(r, metric) < baseline)
    out["worse"] = worse
    out["share_worse"] = worse / len(ok) if ok else None
    counted = len(ok) + len(failed)
    out["share_worse_or_failed"] = (worse + len(failed)) / counted if counted else None
    return out


def _value_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def sensitivity(trials: Sequence[Mapping[str, Any]], metric: str = "mean_score"
                ) -> dict[str, dict]:
    """Per hyperparameter of one method's grid: the mean ``metric`` at each of its values.

    Returns ``{param: {"values": [{"value", "n", "failed", "mean", "min", "max"}, ...],
    "spread": max(mean) − min(mean)}}``. A parameter with a single value in the grid says
    nothing about sensitivity and is left out. Numeric values are sorted ascending, other
    values keep the grid's order.
    """
    params: list[str] = []
    for r in trials:
        for k in (r.get("params") or {}):
            if k not in params:
                params.append(k)
    out: dict[str, dict] = {}
    for p in params:
        groups: dict[str, dict] = {}
        for r in trials:
            if p not in (r.get("params") or {}):
                continue
            v = r["params"][p]
            g = groups.setdefault(_value_key(v), {"value": v, "vals": [], "failed": 0})
            if r.get("status") != "ok":
                g["failed"] += 1
            elif metric_of(r, metric) is not None:
                g["vals"].append(metric_of(r, metric))
        if len(groups) < 2:
            continue
        rows = []
        for g in groups.values():
            vals = g["vals"]
            rows.append({"value": g["value"], "n": len(vals), "failed": g["failed"],
                         "mean": float(np.mean(vals)) if vals else None,
                         "min": min(vals) if vals else None,
                         "max": max(vals) if vals else None})
        if all(_finite(x["value"]) for x in rows):
            rows.sort(key=lambda x: x["value"])
        means = [x["mean"] for x in rows if x["mean"] is not None]
        out[p] = {"values": rows,
                  "spread": (max(means) - min(means)) if len(means) >= 2 else None}
    return out


# =========================================================================== per-prompt views


def _aligned(a: Sequence[Mapping], b: Sequence[Mapping]) -> list[tuple[Mapping, Mapping]]:
    """Pairs of per-prompt records of the same prompt (by id; by position if ids repeat)."""
    ids_a = [r.get("id") for r in a]
    ids_b = [r.get("id") for r in b]
    unique = (None not in ids_a and None not in ids_b and len(set(map(str, ids_a))) == len(a)
              and len(set(map(str, ids_b))) == len(b))
    if not unique:
        return list(zip(a, b))
    by_id = {str(r.get("id")): r for r in b}
    return [(r, by_id[str(r.get("id"))]) for r in a if str(r.get("id")) in by_id]


def pairwise_win_rate(a: Sequence[Mapping], b: Sequence[Mapping]) -> dict[str, Any]:
    """Share of prompts where ``a``'s response scores higher than ``b``'s (ties ½).

    Records need ``score`` (and ``response`` for the same-text tie rule). Returns
    ``{"win": ..., "tie": ..., "n": prompts compared}`` (``None`` rates for no prompt).
    """
    sa, sb, same = [], [], []
    for ra, rb in _aligned(a, b):
        if _finite(ra.get("score")) and _finite(rb.get("score")):
            sa.append(float(ra["score"]))
            sb.append(float(rb["score"]))
            same.append(isinstance(ra.get("response"), str) and isinstance(
                rb.get("response"), str) and ra["response"].strip() == rb["response"].strip())
    if not sa:
        return {"win": None, "tie": None, "n": 0}
    win, tie = win_rate(sa, sb, same=same)  # the evaluation's tie rule, ties ½
    return {"win": win, "tie": tie, "n": len(sa)}


def head_to_head(selected: Mapping[str, Mapping[str, Any] | None], load: PromptLoader
                 ) -> dict[str, Any]:
    """Win-rate matrix between selected runs (one per method).

    ``load(record)`` returns the run's per-prompt records (or ``None``). The result is
    ``{"runs": {method: id}, "matrix": {a: {b: pairwise_win_rate(a, b)}}}`` for a ≠ b:
    ``matrix[a][b]["win"]`` is how often method a's run beats method b's.
    """
    prompts: dict[str, list[dict]] = {}
    runs: dict[str, Any] = {}
    for method, rec in selected.items():
        if rec is None:
            continue
        recs = load(rec)
        if recs:
            prompts[method] = recs
            runs[method] = rec.get("id")
    matrix: dict[str, dict] = {}
    for a in prompts:
        matrix[a] = {b: pairwise_win_rate(prompts[a], prompts[b]) for b in prompts if b != a}
    return {"runs": runs, "matrix": matrix}


def prompt_values(recs: Sequence[Mapping[str, Any]], field: str) -> list[float]:
    """One per-prompt quantity of a run: ``length``, ``kl`` or ``kl_per_token`` (KL over
    the response's sampled tokens ``n_tokens``, end of turn included, as the evaluation
    defines ``kl_vs_sft_per_token``)."""
    out = []
    for r in recs:
        if field == "kl_per_token":
            kl, n = r.get("kl"), r.get("n_tokens")
            if _finite(kl) and _finite(n):
                out.append(float(kl) / max(float(n), 1.0))
        elif _finite(r.get(field)):
            out.append(float(r[field]))
    return out


def topk_distributions(runs: Sequence[Mapping[str, Any]], k_percent: float,
                       metric: str = "mean_score", load: PromptLoader | None = None
                       ) -> dict[str, Any]:
    """Length and KL of one method's top-k% runs.

    ``run_level``: ``describe`` of each run's ``mean_length`` / ``kl_vs_sft`` /
    ``kl_vs_sft_per_token``; ``per_prompt`` (with ``load``): ``describe`` of the pooled
    per-prompt ``length`` / ``kl`` / ``kl_per_token`` of those runs.
    """
    top = top_runs(runs, k_percent, metric) if runs else []
    out: dict[str, Any] = {"k_percent": k_percent, "runs": [r.get("id") for r in top],
                           "run_level": {m: describe(metric_of(r, m) for r in top)
                                         for m in TOPK_METRICS}}
    if load is not None:
        pooled: dict[str, list[float]] = {f: [] for f in TOPK_PROMPT_FIELDS}
        for r in top:
            recs = load(r) or []
            for f in TOPK_PROMPT_FIELDS:
                pooled[f] += prompt_values(recs, f)
        out["per_prompt"] = {f: describe(v) for f, v in pooled.items()}
    return out


# =========================================================================== the analysis


def _pct_change(x: float | None, ref: float | None) -> float | None:
    """100·(x − ref)/|ref|; ``None`` when either is missing or ref is 0."""
    if not (_finite(x) and _finite(ref)) or ref == 0:
        return None
    return 100.0 * (x - ref) / abs(ref)


def _best_section(best: Mapping[str, dict | None], baseline: Mapping[str, Any] | None,
                  reference_method: str | None) -> dict[str, Any]:
    ref_rec = best.get(reference_method) if reference_method else None
    out = {}
    for method, rec in best.items():
        b = brief(rec)
        if b is None:
            out[method] = None
            continue
        m = b["metrics"]
        if baseline:
            b["vs_sft"] = {k: (m[k] - baseline[k]) if _finite(m.get(k)) and
                           _finite(baseline.get(k)) else None
                           for k in ("mean_score", "mean_length")}
        if ref_rec is not None:
            b["vs_reference"] = {
                "method": reference_method,
                "mean_score_pct": _pct_change(m.get("mean_score"),
                                              metric_of(ref_rec, "mean_score")),
                "mean_length_pct": _pct_change(m.get("mean_length"),
                                               metric_of(ref_rec, "mean_length"))}
        out[method] = b
    return out


def analyze(records: Sequence[Mapping[str, Any]], *, baseline: Mapping[str, Any] | None = None,
            load: PromptLoader | None = None, metric: str = "mean_score",
            top_k_percent: float = 25.0, percentile: float = 0.75,
            reference_method: str | None = None) -> dict[str, Any]:
    """The whole robustness analysis of a sweep's (latest) trial records.

    Args:
        records: one record per trial (see :mod:`starpo.run.sweep`); failed ones included.
        baseline: the SFT model's metrics (``{metric: value}``) for ``robustness`` and the
            best runs' ``vs_sft``; ``None`` leaves those out.
        load: per-prompt records of a run (head-to-head and pooled top-k distributions);
            ``None`` leaves those out.
        metric: what "best" means (higher is better).
        top_k_percent: k of the top-k% runs.
        percentile: the second run compared head to head (0.75: the 75th-percentile run).
        reference_method: the method the best runs are compared with in percent (the
            guide compares with DPO); default ``dpo`` if present, else the first method.
    """
    if metric not in registry.headline_names():
        raise ValueError(f"analysis metric must be one of {registry.headline_names()}, "
                         f"not {metric!r}")
    by_method = group_by_method(records)
    if reference_method is None and by_method:
        reference_method = "dpo" if "dpo" in by_method else next(iter(by_method))
    base_value = baseline.get(metric) if baseline else None
    best = {m: best_run(t, metric) for m, t in by_method.items()}
    pct = {m: percentile_run(t, percentile, metric) for m, t in by_method.items()}
    out: dict[str, Any] = {
        "metric": metric, "top_k_percent": top_k_percent, "percentile": percentile,
        "reference_method": reference_method,
        "baseline": dict(baseline) if baseline else None,
        "methods": list(by_method),
        "counts": {m: {"trials": len(t), "ok": sum(is_ok(r, metric) for r in t),
                       "failed": sum(r.get("status") != "ok" for r in t)}
                   for m, t in by_method.items()},
        "best": _best_section(best, baseline, reference_method),
        "percentile_run": {m: brief(r) for m, r in pct.items()},
        "expected": {m: expected_performance(t) for m, t in by_method.items()},
        "robustness": {m: robustness(t, base_value, metric) for m, t in by_method.items()},
        "top_k": {m: topk_distributions(t, top_k_percent, metric, load)
                  for m, t in by_method.items()},
        "sensitivity": {k: {m: sensitivity(t, k) for m, t in by_method.items()}
                        for k in dict.fromkeys((metric,) + SENSITIVITY_METRICS)},
    }
    if load is not None:
        out["head_to_head"] = {"best": head_to_head(best, load),
                               "percentile": head_to_head(pct, load)}
    return out


# =========================================================================== a sweep directory




def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def sweep_baseline(sweep_dir: Path, info: Mapping[str, Any],
                   records: Sequence[Mapping[str, Any]]) -> tuple[dict | None, str | None]:
    """The SFT baseline's metrics and where they came from.

    The shared evaluation of the SFT model (``DIR/shared/<eval>/summary.json``) when the
    sweep has one; otherwise the mean of the SFT metrics each trial's own evaluation
    recorded (the same model and sampling seed, so normally the same numbers).
    """
    base = info.get("baseline") or {}
    if base.get("summary") and base.get("model"):
        summary = _read_json(Path(sweep_dir) / base["summary"])
        if isinstance(summary, dict) and isinstance(summary.get(base["model"]), dict):
            m = summary[base["model"]]
            return {k: m.get(k) for k in registry.sweep_names()}, str(base["summary"])
    sft = [r.get("sft") for r in records if r.get("status") == "ok" and
           isinstance(r.get("sft"), dict)]
    if not sft:
        return None, None
    vals = {k: [s.get(k) for s in sft if _finite(s.get(k))] for k in registry.sweep_names()}
    return ({k: (float(np.mean(v)) if v else None) for k, v in vals.items()},
            "mean of the trials' own SFT evaluations")


def prompt_loader(sweep_dir: Path) -> PromptLoader:
    """``load(record)``: the per-prompt records of a trial (``record["eval_file"]``,
    relative to the sweep directory), cached."""
    cache: dict[str, list[dict] | None] = {}

    def load(rec: Mapping[str, Any]) -> list[dict] | None:
        rel = rec.get("eval_file")
        if not rel:
            return None
        if rel not in cache:
            p = Path(sweep_dir) / rel
            cache[rel] = fileio.read_jsonl(p) if p.is_file() else None
        return cache[rel]
    return load


def analyze_dir(sweep_dir: str | Path) -> dict[str, Any]:
    """:func:`analyze` of a sweep directory (``sweep.json`` + ``trials.jsonl``).

    Only the trials of the sweep's current plan count (a trial removed from the sweep file
    keeps its old line in ``trials.jsonl`` but is left out).
    """
    sweep_dir = Path(sweep_dir)
    info = _read_json(sweep_dir / "sweep.json")
    info = info if isinstance(info, dict) else {}
    ids = [t["id"] for t in info.get("trials", []) if isinstance(t, dict) and "id" in t] or None
    records = latest_records(fileio.read_jsonl(sweep_dir / "trials.jsonl"), ids)
    baseline, source = sweep_baseline(sweep_dir, info, records)
    opts = info.get("analysis") or {}
    res = analyze(records, baseline=baseline, load=prompt_loader(sweep_dir),
                  metric=opts.get("metric", "mean_score"),
                  top_k_percent=float(opts.get("top_k_percent", 25.0)),
                  reference_method=opts.get("reference_method"))
    res["baseline_source"] = source
    res["planned"] = len(ids) if ids is not None else len(records)
    res["finished"] = len(records)
    return res


def write_analysis(sweep_dir: str | Path) -> Path:
    """Write ``DIR/analysis.json`` (atomically) and return its path."""
    sweep_dir = Path(sweep_dir)
    res = analyze_dir(sweep_dir)
    out = sweep_dir / "analysis.json"
    return fileio.write_json(out, res)
