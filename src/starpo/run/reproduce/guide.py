"""Study 5 (the *PO hitchhiker's guide): DPO, LN-DPO and SimPO over a grid, analysed the
guide's way (recipes/reproduction/guide.yaml).

Each seed's sweep is analysed by :mod:`starpo.metrics.analysis` (``analysis.json``: best
run per method, the grid's distributions, share worse than SFT, head-to-head at the best
and 75th-percentile runs, top-k% length and KL); this module only puts the seeds side by
side: every number below is a mean over seeds of the per-seed analysis, with its 95%
interval.
"""

from __future__ import annotations

from starpo.metrics.analysis import describe
from starpo.metrics.names import EVAL_METRICS
from starpo.report.charts import PALETTE, box_chart, interval_chart
from starpo.run.reproduce import runs
from starpo.run.reproduce.doc import (Claim, Figures, claims_notes, claims_table, overall,
                                      seeds_text, table)
from starpo.run.reproduce.estimate import across_seeds, difference, fmt, wilson

NAME = "guide"
TITLE = "5. DPO, LN-DPO and SimPO over a grid (the *PO hitchhiker's guide)"
LABELS = {"dpo": "DPO", "ln_dpo": "LN-DPO", "simpo": "SimPO", "ipo": "IPO"}
BEST_COLUMNS = (("mean_score", "gold score", 3), ("mean_length", "length", 1),
                ("kl_vs_sft", "KL to SFT", 2), ("kl_vs_sft_per_token", "KL / token", 3),
                ("win_vs_chosen", "win vs chosen", 3), ("win_vs_sft", "win vs SFT", 3))
GRID_CHARTS = (("mean_score", "gold score"), ("win_vs_sft", "win rate vs SFT"),
               ("kl_vs_sft", "KL to SFT"), ("mean_length", "length (tokens)"))

WHY = {
    "length": ("We think: length normalisation removes the reward's growth with length; our "
                "world's responses are short (about 10 tokens) and its labels prefer longer ones, "
                "so at this scale the normalised losses can follow the label bias as well and the "
                "length gap the guide saw on 256-token answers has little room."),
    "kl": ("We think: DPO's KL to SFT depends on β and the learning rate of its best run; with our "
           "few grid points the best runs of the methods differ in more than the loss."),
    "robust": ("We think: robustness is a share over a small grid per seed (8 or 16 runs), so one "
               "run more or less below SFT moves it a lot; SimPO's grid here also has twice "
               "the points (γ), not only another loss."),
}


def run(ctx: runs.Context) -> None:
    runs.run_study(ctx, NAME)


def collect(ctx: runs.Context) -> dict | None:
    """Per seed: the sweep's analysis and every trial's metrics."""
    seeds = []
    for seed in ctx.seeds:
        a = runs.read_json(ctx.study_dir(NAME, seed) / "analysis.json")
        recs = runs.trial_records(ctx, NAME, seed)
        if not a or not recs:
            continue
        seeds.append({"seed": seed, "analysis": a,
                      "runs": [{"id": r["id"], "method": r.get("method"),
                                "status": r.get("status"), "params": r.get("params"),
                                "metrics": r.get("metrics"), "ci": r.get("ci")}
                               for r in recs]})
    if not seeds:
        return None
    methods = []
    for s in seeds:
        for m in s["analysis"].get("methods", []):
            if m not in methods:
                methods.append(m)
    return {"seeds": [s["seed"] for s in seeds], "per_seed": seeds, "methods": methods}


def _per_seed(res: dict, get) -> list:
    """``get(analysis)`` for every seed (None where missing)."""
    out = []
    for s in res["per_seed"]:
        try:
            out.append(get(s["analysis"]))
        except (KeyError, TypeError):
            out.append(None)
    return out


def best_values(res: dict, method: str, metric: str) -> list:
    return _per_seed(res, lambda a: a["best"][method]["metrics"][metric])


def best_cis(res: dict, method: str, metric: str) -> list:
    """The best run's own interval of ``metric`` per seed (used with one seed)."""
    out = []
    for s in res["per_seed"]:
        best = ((s["analysis"].get("best") or {}).get(method) or {}).get("id")
        run = next((r for r in s["runs"] if r["id"] == best), None)
        out.append(((run or {}).get("ci") or {}).get(metric))
    return out


def best(res: dict, method: str, metric: str):
    return across_seeds(best_values(res, method, metric), best_cis(res, method, metric))


def best_diff(res: dict, a: str, b: str, metric: str):
    return difference(best_values(res, a, metric), best_values(res, b, metric),
                      best_cis(res, a, metric), best_cis(res, b, metric))


def share_worse(res: dict, method: str) -> list:
    return _per_seed(res, lambda a: a["robustness"][method]["share_worse"])


def share_worse_cis(res: dict, method: str) -> list:
    """Per seed, the Wilson interval of the share worse than SFT (used with one seed)."""
    def ci(a):
        r = a["robustness"][method]
        e = wilson(r["worse"], r["ok"])
        return [e.lo, e.hi] if e.has_interval else None
    return _per_seed(res, ci)


def claims(res: dict) -> list[Claim]:
    ms = res["methods"]
    out = []
    if "dpo" not in ms:
        return out
    for m in [x for x in ("ln_dpo", "simpo") if x in ms]:
        name = LABELS.get(m, m)
        out.append(Claim(f"{name}'s best run is shorter than DPO's",
                         f"length of the best run: {name} − DPO",
                         best_diff(res, m, "dpo", "mean_length"),
                         direction=-1, why_not=WHY["length"]))
        out.append(Claim("… at equal or better score than DPO's",
                         f"gold score of the best run: {name} − DPO",
                         best_diff(res, m, "dpo", "mean_score"),
                         no_worse=True, why_not=WHY["length"]))
        out.append(Claim("DPO stays closest to SFT",
                         f"KL to SFT of the best run: {name} − DPO",
                         best_diff(res, m, "dpo", "kl_vs_sft"),
                         why_not=WHY["kl"]))
    if "simpo" in ms:
        for m in [x for x in ms if x != "simpo"]:
            out.append(Claim("SimPO is the most robust across the grid",
                             f"share of runs worse than SFT: {LABELS.get(m, m)} − SimPO",
                             difference(share_worse(res, m), share_worse(res, "simpo"),
                                        share_worse_cis(res, m),
                                        share_worse_cis(res, "simpo")),
                             why_not=WHY["robust"]))
    return out


def _best_table(res: dict) -> str:
    rows = []
    for m in res["methods"]:
        cells = [LABELS.get(m, m)]
        for metric, _, digits in BEST_COLUMNS:
            cells.append(fmt(best(res, m, metric), digits))
        for key in ("mean_score_pct", "mean_length_pct"):
            cells.append(fmt(across_seeds(_per_seed(
                res, lambda a: a["best"][m]["vs_reference"][key])), 1))
        rows.append(cells)
    return table(["method"] + [h for _, h, _ in BEST_COLUMNS] +
                 ["score vs DPO's best, %", "length vs DPO's best, %"], rows)


def _grid_charts(res: dict, fig: Figures) -> list[str]:
    out = []
    base = {k: across_seeds(_per_seed(res, lambda a: a["baseline"][k])).mean
            for k in EVAL_METRICS}
    for metric, what in GRID_CHARTS:
        groups = []
        for i, m in enumerate(res["methods"]):
            pts, ids = [], []
            for s in res["per_seed"]:
                for r in s["runs"]:
                    if r["method"] == m and r["status"] == "ok":
                        pts.append((r["metrics"] or {}).get(metric))
                        ids.append(f"seed {s['seed']} {r['id']}")
            groups.append({"label": LABELS.get(m, m), "stats": describe(pts), "points": pts,
                           "ids": ids, "color": PALETTE[i % len(PALETTE)]})
        out.append(fig.add(f"guide-grid-{metric}", box_chart(
            groups, title=f"{what} over the grid (all seeds)", ylabel=what,
            baseline=base.get(metric), width=380, height=260),
            f"{what} of every run of each method's grid"))
    return out


def _robustness_table(res: dict) -> str:
    rows = []
    for m in res["methods"]:
        worse = _per_seed(res, lambda a: a["robustness"][m]["worse"])
        ok = _per_seed(res, lambda a: a["robustness"][m]["ok"])
        failed = _per_seed(res, lambda a: a["robustness"][m]["failed"])
        med = _per_seed(res, lambda a: a["expected"][m]["mean_score"]["median"])
        rows.append((LABELS.get(m, m), sum(x or 0 for x in ok), sum(x or 0 for x in failed),
                     sum(x or 0 for x in worse),
                     fmt(across_seeds(share_worse(res, m), share_worse_cis(res, m)), 2),
                     fmt(across_seeds(med))))
    return table(("method", "runs (all seeds)", "failed", "worse than SFT",
                  "share worse than SFT", "median gold score over the grid"), rows)


def _h2h_table(res: dict, which: str) -> str:
    ms = res["methods"]
    rows = []
    for a in ms:
        cells = [LABELS.get(a, a)]
        for b in ms:
            if a == b:
                cells.append("")
                continue
            cells.append(fmt(across_seeds(_per_seed(
                res, lambda x: x["head_to_head"][which]["matrix"][a][b]["win"])), 2))
        rows.append(cells)
    return table(["row beats column"] + [LABELS.get(b, b) for b in ms], rows)


def _topk_table(res: dict) -> str:
    rows = []
    for m in res["methods"]:
        cells = [LABELS.get(m, m)]
        for metric, digits in (("mean_length", 1), ("kl_vs_sft", 2), ("kl_vs_sft_per_token", 3)):
            cells.append(fmt(across_seeds(_per_seed(
                res, lambda a: a["top_k"][m]["run_level"][metric]["mean"])), digits))
        rows.append(cells)
    k = res["per_seed"][0]["analysis"].get("top_k_percent", 25)
    return f"Top {k:g}% runs of each method:\n\n" + table(
        ("method", "length", "KL to SFT", "KL / token"), rows)


def section(res: dict | None, fig: Figures) -> str:
    if not res:
        return f"## {TITLE}\n\nNot run yet: `starpo reproduce --only {NAME}`.\n"
    cl = claims(res)
    ms = res["methods"]
    best_score = []
    for m in ms:
        best_score.append((LABELS.get(m, m), best(res, m, "mean_score")))
    chart = fig.add("guide-best", interval_chart(
        [("best run's gold score", list(range(len(ms))), [e.mean for _, e in best_score],
          [e.lo for _, e in best_score], [e.hi for _, e in best_score])],
        title="Best run per method: gold score (mean over seeds, 95% interval)",
        ylabel="gold score", categories=[n for n, _ in best_score],
        baseline=across_seeds(_per_seed(res, lambda a: a["baseline"]["mean_score"])).mean,
        width=460, height=260), "gold score of each method's best run")
    n_runs = {m: sum(r["method"] == m for r in res["per_seed"][0]["runs"]) for m in ms}
    return "\n\n".join([
        f"## {TITLE}",
        "**The guide:** DPO yields longer responses that stay close to SFT; LN-DPO and "
        "SimPO give shorter responses at equal or better score (best runs: LN-DPO +0.3% "
        "score, −15.9% length; SimPO +2.7%, −22.9%), and SimPO is the most robust across "
        f"its grid. **Ours:** {overall(cl)} ({seeds_text(res['seeds'])}; "
        "grid per seed: " + ", ".join(f"{LABELS.get(m, m)} {n} runs" for m, n in
                                      n_runs.items()) + ").",
        "### Best run per method", _best_table(res), chart,
        "### The whole grid", *_grid_charts(res, fig), _robustness_table(res),
        "### Head to head (per-prompt win rate of the row's run against the column's)",
        "Best runs:", _h2h_table(res, "best"),
        "75th-percentile runs:", _h2h_table(res, "percentile"),
        "### Length and KL of the top runs", _topk_table(res),
        "### The guide's findings", claims_table(cl), claims_notes(cl)]).rstrip() + "\n"
