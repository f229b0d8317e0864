"""Study 2 (LIONs, offline DPO scaling): preference-set size × training steps, every run
from the seed's SFT model (recipes/reproduction/dpo_scaling.yaml)."""

from __future__ import annotations

from starpo.recipe import load_recipe
from starpo.report.charts import interval_chart
from starpo.run.reproduce import runs
from starpo.run.reproduce.doc import (Claim, Figures, claims_notes, claims_table, overall,
                                      seeds_text, table)
from starpo.run.reproduce.estimate import across_seeds, difference, fmt

NAME = "dpo_scaling"
TITLE = "2. Offline DPO: preference-set size × training steps (LIONs)"
SIZE = "stages.dpo.data.sources.0.n"
STEPS = "stages.dpo.train.max_steps"

WHY_NOT = ("We think a 2M-parameter policy learns what the world's preference labels teach "
           "(prefer the correct answer, refuse harm, and the labels' length bias) from a few "
           "hundred pairs, and the labels are noisy (12% flipped, length-biased), so more "
           "pairs of the same kind add little that is new; LIONs' preference mixture is "
           "large and diverse, which is what lets more data raise the saturation point "
           "there.")


def run(ctx: runs.Context) -> None:
    runs.run_study(ctx, NAME)


def collect(ctx: runs.Context) -> dict | None:
    """Per (size, steps) and seed: the DPO model's gold score and interval; the SFT's."""
    cells: dict[tuple[int, int], dict] = {}
    sft = [None] * len(ctx.seeds)
    dpo = None
    for k, seed in enumerate(ctx.seeds):
        for rec in runs.trial_records(ctx, NAME, seed):
            if rec.get("status") != "ok":
                continue
            key = (int(rec["params"][SIZE]), int(rec["params"][STEPS]))
            c = cells.setdefault(key, {"size": key[0], "steps": key[1],
                                       "score": [None] * len(ctx.seeds),
                                       "ci": [None] * len(ctx.seeds)})
            c["score"][k] = (rec.get("metrics") or {}).get("mean_score")
            c["ci"][k] = (rec.get("ci") or {}).get("mean_score")
            sft[k] = (rec.get("sft") or {}).get("mean_score", sft[k])
            if dpo is None:
                st = load_recipe(runs.record_dir(ctx, NAME, seed, rec) / "recipe.yaml").stage("dpo")
                dpo = {"loss": st.loss, "beta": st.beta, "batch_size": st.train.batch_size}
    if not cells:
        return None
    return {"seeds": runs.seeds_with_results(ctx, NAME), "sft_score": sft, "dpo": dpo,
            "cells": sorted(cells.values(), key=lambda c: (c["size"], c["steps"]))}


def _grid(res: dict):
    sizes = sorted({c["size"] for c in res["cells"]})
    steps = sorted({c["steps"] for c in res["cells"]})
    at = {(c["size"], c["steps"]): c for c in res["cells"]}
    return sizes, steps, at


def _e(c):
    return across_seeds(c["score"], c["ci"]) if c else across_seeds([])


def _gain(after: list, before: list) -> list:
    """Per seed, ``after − before`` (None where either is missing)."""
    return [None if x is None or y is None else x - y for x, y in zip(after, before)]


def claims(res: dict) -> list[Claim]:
    """More data helps at the largest budget; and it keeps more steps helping longer
    (the gain from the second-largest to the largest budget grows with the set's size)."""
    sizes, steps, at = _grid(res)
    if len(sizes) < 2 or len(steps) < 1:
        return []
    lo_n, hi_n, top = sizes[0], sizes[-1], steps[-1]
    a, b = at.get((hi_n, top)), at.get((lo_n, top))
    out = []
    if a and b:
        out.append(Claim(paper="more preference data gives a better model when training long",
                         measure=f"gold score at {top} steps: {hi_n} − {lo_n} pairs",
                         diff=difference(a["score"], b["score"], a["ci"], b["ci"]),
                         why_not=WHY_NOT))
    if len(steps) >= 2:
        mid = steps[-2]
        cs = [at.get(k) for k in ((hi_n, top), (hi_n, mid), (lo_n, top), (lo_n, mid))]
        if all(cs):
            gain_hi = _gain(cs[0]["score"], cs[1]["score"])
            gain_lo = _gain(cs[2]["score"], cs[3]["score"])
            out.append(Claim(
                paper="more data raises the saturation point",
                measure=f"gain from {mid} to {top} steps: with {hi_n} pairs − with {lo_n} pairs",
                diff=difference(gain_hi, gain_lo), why_not=WHY_NOT))
    return out


def section(res: dict | None, fig: Figures) -> str:
    if not res:
        return f"## {TITLE}\n\nNot run yet: `starpo reproduce --only {NAME}`.\n"
    sizes, steps, at = _grid(res)
    d = res.get("dpo") or {}
    rows = [[f"{n} pairs"] + [fmt(_e(at.get((n, s)))) for s in steps] for n in sizes]
    best = []
    for n in sizes:
        es = [(s, _e(at.get((n, s)))) for s in steps]
        es = [(s, e) for s, e in es if e.known]
        if es:
            best.append(f"{n} pairs: {max(es, key=lambda x: x[1].mean)[0]} steps")
    sft = across_seeds(res["sft_score"])
    series = []
    for n in sizes:
        es = [_e(at.get((n, s))) for s in steps]
        series.append((f"{n} pairs", steps, [e.mean for e in es], [e.lo for e in es],
                       [e.hi for e in es]))
    chart = fig.add("dpo-scaling", interval_chart(
        series, title="Gold score after offline DPO (mean over seeds, 95% interval)",
        xlabel=f"training steps (batch of {d.get('batch_size')} pairs)", ylabel="gold score",
        baseline=sft.mean, width=560, height=300),
        "gold score against DPO steps for each preference-set size")
    cl = claims(res)
    return "\n\n".join([
        f"## {TITLE}",
        "**The paper:** increasing the preference dataset raises the point of saturation: "
        "with more data, more training steps keep improving the model. **Ours:** "
        f"{overall(cl)} ({seeds_text(res['seeds'])}).",
        f"{d.get('loss', 'dpo').upper()} (β {d.get('beta')}, batch {d.get('batch_size')}) from "
        f"the seed's SFT model (gold score {fmt(sft)}) on the "
        "first n pairs of the world's preference set, for each number of steps; the best "
        f"budget per size (highest mean): {'; '.join(best)}.",
        table(["preference set"] + [f"{s} steps" for s in steps], rows),
        chart, claims_table(cl), claims_notes(cl)]).rstrip() + "\n"
