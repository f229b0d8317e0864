"""Study 3 (LIONs, online vs offline DPO at equal budget), per judge.

From the seed's offline DPO model, two ways to spend the same training budget: the
offline arm (``offline``: more steps on the preference set) and the online stage (rounds
of sample → judge → best-vs-worst pairs → DPO), once per judge. The offline arm's steps,
batch size, learning rate and β are set here from the online stage's settings, so the
budgets stay equal when those change (recipes/reproduction/online.yaml and pipeline.yaml).

Judges are the entries of the sweep file's ``stages.online.judge`` list; :data:`JUDGES`
says how the document names each type (an unknown type is shown by its name).
"""

from __future__ import annotations

import math

from starpo import fileio
from starpo.judge_kinds import is_pointwise
from starpo.recipe import Recipe, load_recipe
from starpo.report.charts import interval_chart
from starpo.run.reproduce import runs
from starpo.run.reproduce.doc import (Claim, Figures, claims_notes, claims_table, overall,
                                      seeds_text, table)
from starpo.run.reproduce.estimate import across_seeds, difference, fmt

NAME = "online"
TITLE = "3. Online vs offline DPO at equal budget, per judge (LIONs)"
JUDGE = "stages.online.judge"
METRICS = ("mean_score", "win_vs_sft", "kl_vs_sft", "mean_length")
ROUND_FIELDS = ("mean_score", "mean_gold", "pair_gold_agreement", "mean_tokens")

# judge type → (how the document calls it, whether it reads the gold reward)
JUDGES = {
    "reward_model": ("learned reward model", False),
    "world_labeler": ("world labeler (AI-annotator analogue)", False),
    "pairwise_rm": ("trained pairwise judge (PairRM-like)", False),
    "pairwise": ("PairRM", False),
    "gold": ("gold reward (upper bound)", True),
}

WHY_NOT = {
    False: ("We think the reason is the judge: it is learned from (or is) the same noisy, "
            "length-biased annotator that labelled the offline pairs, so its preferences add "
            "little the offline set did not already hold, and the policy can climb the judge's own"
            " errors (compare its pair-gold agreement and the length column). LIONs' PairRM was "
            "trained on other, larger human preference data than its policy's offline set."),
    True: ("Even a judge that reads the gold reward does not beat the offline arm, so we "
           "think the online stage's settings (rounds, prompts, samples, learning rate) are "
           "too weak for this model, whatever the judge."),
}

WHY_WEAK = {
    False: ("Online DPO is ahead of the offline arm on average, but the gap (paired by "
            "seed) varies from seed to seed by about as much as its size, and three seeds "
            "give a wide 95% interval (4.3 standard errors each side). The quickstart "
            "(README) measures online DPO against the offline DPO model it starts from "
            "(not an offline arm given the same extra steps, as here) on six seeds, each "
            "with a paired interval over 665 prompts, and finds it ahead for all six."),
    True: ("Even with the gold reward as the judge the online arm's lead stays within the "
           "seed-to-seed spread of three seeds; the online stage at this budget (the steps "
           "above) moves the model by a few hundredths, whatever the judge."),
}


def equal_budget(recipe: Recipe) -> dict:
    """Overrides giving the offline arm the online stage's budget: as many optimizer steps
    (rounds × epochs × ⌈prompts per round / batch size⌉, one pair per prompt at most),
    with the same batch size, learning rate, schedule, loss and β."""
    on = recipe.stage("online")
    prompts = on.prompts_per_round or next(s.n for s in on.data.sources)
    per_round = math.ceil(prompts * (1 - on.data.eval_fraction) / on.train.batch_size)
    steps = max(1, math.ceil(on.rounds * on.train.epochs * per_round))
    t = on.train
    return {"stages.offline.train.max_steps": steps,
            "stages.offline.train.batch_size": t.batch_size,
            "stages.offline.train.lr": t.lr, "stages.offline.train.scheduler": t.scheduler,
            "stages.offline.train.warmup_ratio": t.warmup_ratio,
            "stages.offline.loss": on.loss, "stages.offline.beta": on.beta}


def run(ctx: runs.Context) -> None:
    runs.run_study(ctx, NAME, equal_budget(runs.pipeline_recipe(ctx, ctx.seeds[0])))


def judge_type(params: dict) -> str:
    j = params.get(JUDGE) or {}
    return str(j.get("type") if isinstance(j, dict) else j)


def _blank(n: int) -> dict:
    return {"values": {m: [None] * n for m in METRICS}, "cis": {m: [None] * n for m in METRICS}}


def _put(arm: dict, k: int, m: dict | None) -> None:
    for x in METRICS:
        arm["values"][x][k] = (m or {}).get(x)
        arm["cis"][x][k] = (m or {}).get(f"{x}_ci")


def collect(ctx: runs.Context) -> dict | None:
    """Per seed: the SFT, offline-DPO start, offline arm and each judge's online model,
    and each online stage's rounds (judge score, gold score of the same samples, share of
    pairs whose chosen response also has the higher gold reward, length)."""
    n = len(ctx.seeds)
    arms = {"sft": _blank(n), "dpo": _blank(n), "offline": _blank(n)}
    judges: dict[str, dict] = {}
    found = False
    for k, seed in enumerate(ctx.seeds):
        for rec in runs.trial_records(ctx, NAME, seed):
            if rec.get("status") != "ok":
                continue
            found = True
            d = runs.record_dir(ctx, NAME, seed, rec)
            summary = runs.eval_summary(d)
            for a in arms:
                if summary.get(a):
                    _put(arms[a], k, summary[a])
            jt = judge_type(rec["params"])
            label, upper = JUDGES.get(jt, (jt, False))
            j = judges.setdefault(jt, {"type": jt, "label": label, "upper_bound": upper,
                                       **_blank(n), "rounds": []})
            _put(j, k, summary.get("online"))
            for r in fileio.read_jsonl(d / "online" / "rounds.jsonl"):
                i = int(r["round"]) - 1
                while len(j["rounds"]) <= i:
                    j["rounds"].append({f: [None] * n for f in ROUND_FIELDS})
                for f in ROUND_FIELDS:
                    j["rounds"][i][f][k] = r.get(f)
    if not found:
        return None
    budget = None
    shared = ctx.study_dir(NAME, ctx.seeds[0]) / "shared" / "recipe.yaml"
    if shared.is_file():
        t = load_recipe(shared).stage("offline").train
        budget = {"steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr}
    return {"seeds": runs.seeds_with_results(ctx, NAME), "budget": budget, "arms": arms,
            "judges": list(judges.values())}


def _e(arm: dict, metric: str = "mean_score"):
    return across_seeds(arm["values"][metric], arm["cis"][metric])


def claims(res: dict) -> list[Claim]:
    """Online beats the offline arm, per judge (the gold judge as the upper bound)."""
    off = res["arms"]["offline"]
    out = []
    for j in res["judges"]:
        out.append(Claim(
            paper="online DPO beats offline DPO" + (" (judge: PairRM)" if not j["upper_bound"]
                                                    else " (an upper bound: no paper figure)"),
            measure=f"gold score: online with {j['label']} − offline arm",
            diff=difference(j["values"]["mean_score"], off["values"]["mean_score"],
                            j["cis"]["mean_score"], off["cis"]["mean_score"]),
            why_not=WHY_NOT[bool(j["upper_bound"])],
            why_weak=WHY_WEAK[bool(j["upper_bound"])]))
    return out


def _over_rounds(j: dict, field: str) -> list:
    """Per seed, the mean of a per-round field over the rounds."""
    out = []
    for k in range(len(j["values"]["mean_score"])):
        xs = [r[field][k] for r in j["rounds"] if runs.finite(r[field][k])]
        out.append(sum(xs) / len(xs) if xs else None)
    return out


def _budget_text(b: dict | None) -> str:
    if not b:
        return ""
    return f" ({b['steps']} steps of {b['batch_size']} pairs, learning rate {b['lr']:g})"


def _round_est(j: dict, field: str, i: int):
    return across_seeds(j["rounds"][i][field]) if i < len(j["rounds"]) else across_seeds([])


def _judge_drift(j: dict | None) -> str:
    """The judge's mean score, last − first round; a ranking judge (its scores are ranks,
    mean ½ in every round by construction) has none."""
    if j is None:
        return ""
    if not is_pointwise(j["type"]):
        return "— (scores are ranks)"
    return fmt(_drift(j, "mean_score"))


def _drift(j: dict, field: str):
    """Last round − first round of a per-round field, paired by seed."""
    if len(j["rounds"]) < 2:
        return across_seeds([])
    return difference(j["rounds"][-1][field], j["rounds"][0][field])


def section(res: dict | None, fig: Figures) -> str:
    if not res:
        return f"## {TITLE}\n\nNot run yet: `starpo reproduce --only {NAME}`.\n"
    arms, judges = res["arms"], res["judges"]
    named = [("SFT", arms["sft"]), ("offline DPO (start)", arms["dpo"]),
             ("offline arm (+ equal budget)", arms["offline"])] + \
        [(f"online: {j['label']}", j) for j in judges]
    rows = []
    for name, a in named:
        j = a if any(a is x for x in judges) else None
        agree = across_seeds(_over_rounds(j, "pair_gold_agreement")) if j else None
        rows.append((name, fmt(_e(a)), fmt(_e(a, "win_vs_sft")), fmt(_e(a, "kl_vs_sft"), 2),
                     fmt(_e(a, "mean_length"), 1), fmt(agree) if j else "",
                     _judge_drift(j),
                     fmt(_drift(j, "mean_gold")) if j else ""))
    cats = [name.replace("online: ", "") for name, _ in named[1:]]
    es = [_e(a) for _, a in named[1:]]
    sft = _e(arms["sft"])
    chart = fig.add("online-vs-offline", interval_chart(
        [("gold score", list(range(len(es))), [e.mean for e in es], [e.lo for e in es],
          [e.hi for e in es])],
        title="Gold score: offline start, offline arm, online per judge (95% interval)",
        ylabel="gold score", categories=cats, baseline=sft.mean, width=760, height=280),
        "gold score of the offline and online arms")
    n_rounds = max((len(j["rounds"]) for j in judges), default=0)
    charts = [chart]
    for field, what, name in (("mean_gold", "gold score of the round's samples", "online-gold"),
                              ("pair_gold_agreement", "pairs whose chosen response has the "
                               "higher gold reward", "online-agreement")):
        series = []
        for j in judges:
            e = [_round_est(j, field, i) for i in range(n_rounds)]
            series.append((j["label"], list(range(1, n_rounds + 1)), [x.mean for x in e],
                           [x.lo for x in e], [x.hi for x in e]))
        if n_rounds:
            charts.append(fig.add(name, interval_chart(
                series, title=f"Per online round: {what}", xlabel="round", width=620,
                height=280), f"per round: {what}, one line per judge"))
    cl = claims(res)
    return "\n\n".join([
        f"## {TITLE}",
        "**The paper:** online DPO (samples of the policy ranked by PairRM, best vs worst) "
        "improves over offline DPO on chat benchmarks. **Ours:** "
        f"{overall([c for c, j in zip(cl, judges) if not j['upper_bound']])} with judges "
        "that never read the gold reward "
        f"({seeds_text(res['seeds'])}).",
        "Both arms start from the same offline DPO model and train for the same number of "
        f"steps{_budget_text(res.get('budget'))} with the same batch size, learning rate and "
        "β: the offline arm on the "
        "preference set, the online arm on pairs its own samples make, judged by each "
        "judge. The judge columns: the share of selected pairs whose chosen response also "
        "has the higher gold reward (over all rounds), and how the judge's mean score and "
        "the gold score of the same samples moved from the first round to the last (the "
        "judge rising while gold falls is over-optimisation of the judge). Judge scores are "
        "on each judge's own scale.",
        table(("model", "gold score", "win vs SFT", "KL to SFT", "length",
               "pair-gold agreement", "judge score: last − first round",
               "gold: last − first round"), rows),
        *charts, claims_table(cl), claims_notes(cl)]).rstrip() + "\n"
