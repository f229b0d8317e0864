"""The eval stage: sample every model of the run once per evaluation prompt, judge the
responses, and write ``DIR/<stage>/summary.json`` and ``DIR/<stage>/<model>.jsonl``
(``DIR/eval/`` for the default stage name). The metrics are :mod:`starpo.metrics.evaluation`'s.

Under ``accelerate launch`` with several processes only the main process evaluates (on
its own device); the others skip the stage without waiting for it, so no collective
operation can time out during a long evaluation.
"""

from __future__ import annotations

from starpo.recipe import EvalStage


def run_eval(ctx, stage: EvalStage) -> dict:
    from starpo.metrics.evaluation import brief, run_evaluation

    rt = ctx.runtime
    if not rt.is_main:
        return {"skipped": f"process {rt.process_index}: the main process evaluates"}
    res = run_evaluation(ctx, stage, device=rt.device)
    headline = brief(res.summary)
    for name, m in headline.items():
        parts = [f"{k} {v:.3f}" for k, v in m.items() if v is not None]
        ctx.log(f"  {name}: " + ", ".join(parts))
    return {"models": list(res.summary), "reference": res.reference,
            "prompts": res.meta["prompts"], "metrics": headline}
