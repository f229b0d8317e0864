"""The eval stage: sample every model of the run once per evaluation prompt, judge the
responses, and write ``DIR/<stage>/summary.json`` and ``DIR/<stage>/<model>.jsonl``
(``DIR/eval/`` for the default stage name). The metrics are :mod:`starpo.evaluation`'s."""

from __future__ import annotations

from starpo.config import EvalStage


def run_eval(ctx, stage: EvalStage) -> dict:
    from starpo.evaluation import brief, run_evaluation

    res = run_evaluation(ctx, stage)
    headline = brief(res.summary)
    for name, m in headline.items():
        parts = [f"{k} {v:.3f}" for k, v in m.items() if v is not None]
        ctx.log(f"  {name}: " + ", ".join(parts))
    return {"models": list(res.summary), "reference": res.reference,
            "prompts": res.meta["prompts"], "metrics": headline}
