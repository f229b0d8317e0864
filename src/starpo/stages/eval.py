"""The eval stage: sample every model of the run once per evaluation prompt, judge the
responses, and write ``DIR/<stage>/summary.json`` and ``DIR/<stage>/<model>.jsonl``
(``DIR/eval/`` for the default stage name). The metrics are :mod:`starpo.evaluation`'s.

Under ``accelerate launch`` with several processes only the main process evaluates (on
its own device); the others skip the stage without waiting for it, so no collective
operation can time out during a long evaluation.
"""

from __future__ import annotations

from starpo.recipe.schema import EvalStage


def run_eval(ctx, stage: EvalStage) -> dict:
    from accelerate import PartialState

    from starpo.metrics.evaluation import brief, run_evaluation

    state = PartialState()
    if state.num_processes > 1 and not state.is_main_process:
        return {"skipped": f"process {state.process_index}: the main process evaluates"}
    device = state.device if state.num_processes > 1 else None
    res = run_evaluation(ctx, stage, device=device)
    headline = brief(res.summary)
    for name, m in headline.items():
        parts = [f"{k} {v:.3f}" for k, v in m.items() if v is not None]
        ctx.log(f"  {name}: " + ", ".join(parts))
    return {"models": list(res.summary), "reference": res.reference,
            "prompts": res.meta["prompts"], "metrics": headline}
