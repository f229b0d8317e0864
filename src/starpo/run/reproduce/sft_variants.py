"""Study 1 (LIONs, SFT): padding vs packing vs concatenate-and-cut, with and without loss
masking. Each variant trains its own SFT model for one epoch of the same conversations,
then the same DPO stage; both models are evaluated (recipes/reproduction/sft_variants.yaml).
"""

from __future__ import annotations

from starpo.report.charts import interval_chart
from starpo.run.reproduce import runs
from starpo.run.reproduce.doc import (Claim, Figures, claims_notes, claims_table, overall,
                                      seeds_text, table)
from starpo.run.reproduce.estimate import across_seeds, difference, fmt

NAME = "sft_variants"
TITLE = "1. SFT: padding, packing and loss masking (LIONs)"
MODE = "stages.sft.packing.mode"
MASK = "stages.sft.packing.loss_masking"
METRICS = ("mean_score", "mean_length", "win_vs_sft", "kl_vs_sft")
MODE_NAMES = {"pack": "packing", "pad": "padding", "concat": "concatenate-and-cut"}

WHY_NOT = ("We think this is why: LIONs explains its result by the other variants overfitting the "
           "chat template (every padded or unmasked row starts with the same template tokens), "
           "which costs it on benchmarks that use other templates. Our evaluation prompts use the "
           "training template and come from the same synthetic world, so that mechanism has "
           "nothing to act on here; what is left is how many assistant tokens each variant trains "
           "on per step, and one epoch of a 2M-parameter model.")


def run(ctx: runs.Context) -> None:
    runs.run_study(ctx, NAME)


def label(mode: str, masking: bool) -> str:
    return f"{MODE_NAMES.get(mode, mode)}, {'masked' if masking else 'unmasked'}"


def collect(ctx: runs.Context) -> dict | None:
    """Per variant and seed: the SFT model's and the DPO model's metrics and intervals."""
    variants: dict[tuple, dict] = {}
    conversations = None
    for k, seed in enumerate(ctx.seeds):
        for rec in runs.trial_records(ctx, NAME, seed):
            if rec.get("status") != "ok":
                continue
            mode, mask = rec["params"].get(MODE, "pack"), bool(rec["params"].get(MASK, True))
            v = variants.setdefault((mode, mask), {
                "mode": mode, "masking": mask, "label": label(mode, mask),
                **{m: {"values": {x: [None] * len(ctx.seeds) for x in METRICS},
                       "cis": {x: [None] * len(ctx.seeds) for x in METRICS}}
                   for m in ("sft", "dpo")}})
            d = runs.record_dir(ctx, NAME, seed, rec)
            summary = runs.eval_summary(d)
            conversations = conversations or (runs.read_json(d / "sft" / "stage.json")
                                              or {}).get("conversations")
            for model in ("sft", "dpo"):
                for x in METRICS:
                    v[model]["values"][x][k] = (summary.get(model) or {}).get(x)
                    v[model]["cis"][x][k] = (summary.get(model) or {}).get(f"{x}_ci")
    if not variants:
        return None
    return {"seeds": runs.seeds_with_results(ctx, NAME), "conversations": conversations,
            "variants": list(variants.values())}


def _est(v: dict, model: str, metric: str):
    return across_seeds(v[model]["values"][metric], v[model]["cis"][metric])


def _diff(a: dict, b: dict, model: str):
    return difference(a[model]["values"]["mean_score"], b[model]["values"]["mean_score"],
                      a[model]["cis"]["mean_score"], b[model]["cis"]["mean_score"])


def claims(res: dict) -> list[Claim]:
    """Packing + masking against every other variant, for the SFT model and after DPO."""
    vs = res["variants"]
    best = next((v for v in vs if v["mode"] == "pack" and v["masking"]), None)
    if best is None:
        return []
    out = []
    for model, what in (("sft", "SFT"), ("dpo", "after DPO")):
        for other in vs:
            if other is best:
                continue
            out.append(Claim(paper="packing + masking gives the best model",
                             measure=f"{what} gold score: packing, masked − {other['label']}",
                             diff=_diff(best, other, model), why_not=WHY_NOT))
    return out


def section(res: dict | None, fig: Figures) -> str:
    if not res:
        return f"## {TITLE}\n\nNot run yet: `starpo reproduce --only {NAME}`.\n"
    vs = res["variants"]
    rows = [(v["label"], fmt(_est(v, "sft", "mean_score")), fmt(_est(v, "sft", "mean_length"), 1),
             fmt(_est(v, "dpo", "mean_score")), fmt(_est(v, "dpo", "win_vs_sft")),
             fmt(_est(v, "dpo", "kl_vs_sft"), 2)) for v in vs]
    cl = claims(res)
    cats = [v["label"] for v in vs]

    def series(model, name):
        es = [_est(v, model, "mean_score") for v in vs]
        return (name, list(range(len(vs))), [e.mean for e in es], [e.lo for e in es],
                [e.hi for e in es])
    chart = fig.add("sft-variants", interval_chart(
        [series("sft", "SFT model"), series("dpo", "after the same DPO stage")],
        title="Gold score by SFT variant (mean over seeds, 95% interval)",
        ylabel="gold score", categories=cats, width=760, height=280),
        "gold score of each SFT variant and of DPO after it")
    return "\n\n".join([
        f"## {TITLE}",
        "**The paper:** combining packing with loss masking gives the best SFT model on "
        "both data scales (and the best model after DPO). **Ours:** "
        f"{overall(cl)} ({seeds_text(res['seeds'])}).",
        f"Each variant trains one epoch over the same {res.get('conversations') or ''} "
        "conversations (packing: whole "
        "conversations placed into 128-token rows; padding: one conversation per row; "
        "concatenate-and-cut: the token stream cut into 128-token rows; masked: loss on "
        "assistant tokens only), then the same DPO stage; gold score on the held-out "
        "prompts.",
        table(("SFT variant", "SFT gold score", "SFT length", "after DPO: gold score",
               "after DPO: win vs its SFT", "after DPO: KL to its SFT"), rows),
        chart, claims_table(cl), claims_notes(cl)]).rstrip() + "\n"
