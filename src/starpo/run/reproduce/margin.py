"""Study 4 (LIONs' open question): the token probability margin during DPO.

LIONs observes that in well-trained runs the change of the probability margin between
chosen and rejected responses follows a parabola over training, and asks whether that is
general. Every DPO-family run of studies 2 and 5 logs ``token_prob_margin`` (the mean
per-token probability of the chosen minus the rejected response, on each training
batch; :func:`starpo.train.preference.pair_metrics`), so this study trains nothing:
it reads those logs.

Good and bad runs: the top and the bottom quarter of all runs by their gold-score gain
over their SFT model. Shape: each run's curve against training progress (step / last
step) is fitted with a quadratic; it is *parabolic* when the fit is concave with its
vertex inside the run (progress 0.1–0.9), i.e. the margin rises, peaks and falls.
"""

from __future__ import annotations

import math

import numpy as np

from starpo.report.charts import interval_chart
from starpo.run.reproduce import runs
from starpo.run.reproduce.doc import Claim, Figures, claims_notes, claims_table, overall, table
from starpo.run.reproduce.estimate import Estimate, across_seeds, fmt, wilson

NAME = "margin"
TITLE = "4. The token probability margin during DPO (LIONs' open question)"
SOURCES = ("dpo_scaling", "guide")     # the studies whose DPO runs are read
METRIC = "token_prob_margin"
BINS = 10
QUARTER = 0.25

WHY_NOT = ("We think our runs are too short for it (tens to a couple of hundred steps "
           "with a decaying learning rate), and the margin is logged on single training "
           "batches, so a curve has few, noisy points; a peak followed by a fall needs the "
           "long training of LIONs' runs to show.")


def run(ctx: runs.Context) -> None:
    """Nothing to train: the runs of studies 2 and 5 are read."""


def collect(ctx: runs.Context) -> dict | None:
    """Every ok DPO-family run of the source studies: its curve and its gain over SFT."""
    out = []
    for study in SOURCES:
        for seed in ctx.seeds:
            for rec in runs.trial_records(ctx, study, seed):
                m, s = rec.get("metrics") or {}, rec.get("sft") or {}
                if rec.get("status") != "ok" or not runs.finite(m.get("mean_score")) or \
                        not runs.finite(s.get("mean_score")):
                    continue
                log = runs.metrics_log(runs.record_dir(ctx, study, seed, rec), "dpo")
                pts = [(r["step"], r[METRIC]) for r in log
                       if runs.finite(r.get(METRIC)) and runs.finite(r.get("step"))]
                if len(pts) < 3:
                    continue
                out.append({"study": study, "seed": seed, "id": rec["id"],
                            "method": rec.get("method"),
                            "gain": m["mean_score"] - s["mean_score"],
                            "steps": [p[0] for p in pts], "margin": [p[1] for p in pts]})
    return {"seeds": list(ctx.seeds), "runs": out} if out else None


def is_parabolic(steps, values) -> bool:
    """A concave quadratic fit with its vertex at progress 0.1–0.9 (module docstring)."""
    x = np.asarray(steps, dtype=float)
    x = x / max(x.max(), 1.0)
    a, b, _ = np.polyfit(x, np.asarray(values, dtype=float), 2)
    if a >= 0:
        return False
    return 0.1 <= -b / (2 * a) <= 0.9


def groups(res: dict) -> tuple[list[dict], list[dict]]:
    """(good, bad): the top and bottom quarter of the runs by gold-score gain."""
    rs = sorted(res["runs"], key=lambda r: -r["gain"])
    k = max(1, math.ceil(QUARTER * len(rs)))
    if len(rs) < 2:
        return rs, []
    return rs[:k], rs[-k:]


def binned(group: list[dict]) -> list[Estimate]:
    """Per progress bin, the mean margin over the group's runs (each run's mean in the
    bin) with its 95% interval over runs."""
    per_bin: list[list[float]] = [[] for _ in range(BINS)]
    for r in group:
        top = max(r["steps"]) or 1
        vals: list[list[float]] = [[] for _ in range(BINS)]
        for s, v in zip(r["steps"], r["margin"]):
            vals[min(BINS - 1, int(s / top * BINS))].append(v)
        for i, vs in enumerate(vals):
            if vs:
                per_bin[i].append(sum(vs) / len(vs))
    return [across_seeds(v) for v in per_bin]


def share_parabolic(group: list[dict]) -> Estimate:
    k = sum(is_parabolic(r["steps"], r["margin"]) for r in group)
    return wilson(k, len(group))


def claims(res: dict) -> list[Claim]:
    good, _ = groups(res)
    share = share_parabolic(good)
    # the finding holds when most good runs are parabolic: the share minus one half
    diff = Estimate(None) if not share.known else Estimate(
        share.mean - 0.5, share.lo - 0.5, share.hi - 0.5, share.n)
    return [Claim(paper="well-trained runs show a parabolic probability margin",
                  measure="share of good runs with a parabolic margin − ½", diff=diff,
                  why_not=WHY_NOT)]


def section(res: dict | None, fig: Figures) -> str:
    if not res:
        return (f"## {TITLE}\n\nNo DPO run to read yet: it reads studies 2 and 5 "
                f"(`starpo reproduce --only {','.join(SOURCES)}`).\n")
    good, bad = groups(res)
    xs = [(i + 0.5) / BINS for i in range(BINS)]
    series = []
    for name, g in (("good runs (top quarter)", good), ("bad runs (bottom quarter)", bad)):
        if g:
            e = binned(g)
            series.append((name, xs, [x.mean for x in e], [x.lo for x in e], [x.hi for x in e]))
    chart = fig.add("token-prob-margin", interval_chart(
        series, title="Token probability margin (chosen − rejected) during DPO",
        xlabel="training progress (step / last step)", ylabel="margin", width=560,
        height=300), "token probability margin over training, good and bad runs")
    examples = []
    for name, r in (("best run", good[0] if good else None),
                    ("worst run", bad[-1] if bad else None)):
        if r:
            examples.append((f"{name}: {r['study']} seed {r['seed']} {r['id']}",
                             [s / (max(r["steps"]) or 1) for s in r["steps"]], r["margin"],
                             [None] * len(r["steps"]), [None] * len(r["steps"])))
    chart2 = fig.add("token-prob-margin-examples", interval_chart(
        examples, title="The best and the worst run's margin", xlabel="training progress",
        ylabel="margin", width=560, height=300), "margin curves of the best and worst run") \
        if examples else ""
    rows = [(name, len(g), fmt(across_seeds([r["gain"] for r in g])),
             fmt(share_parabolic(g), 2))
            for name, g in (("good (top quarter by gain over SFT)", good),
                            ("bad (bottom quarter)", bad), ("all runs", res["runs"])) if g]
    cl = claims(res)
    return "\n\n".join([
        f"## {TITLE}",
        "**The paper:** the probability margin of well-trained runs changes along a "
        "parabola over training, and the paper leaves open whether that is general. "
        f"**Ours:** {overall(cl)} ({len(res['runs'])} DPO, LN-DPO and SimPO runs of "
        "studies 2 and 5).",
        "A run is parabolic when a quadratic fit of its margin against training progress "
        "is concave with its vertex at progress 0.1–0.9; shares with a 95% Wilson "
        "interval.",
        table(("runs", "count", "gold-score gain over SFT", "share parabolic"), rows),
        chart, chart2, claims_table(cl), claims_notes(cl)]).rstrip() + "\n"
