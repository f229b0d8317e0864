"""The dpo stage: offline preference optimisation (DPO, LN-DPO, SimPO, IPO, or a loss of
the user's) on the stage's pairs, reference log-probs cached, on the shared loop."""

from __future__ import annotations

from starpo import losses
from starpo.model import loading
from starpo.stages.preference import prepare_pairs, train_preference


def run_dpo(ctx, stage) -> dict:
    seed = ctx.seed_for(stage)
    start = ctx.resolve_model(stage.model, before=stage.name)
    ref_path = ctx.resolve_model(stage.reference, before=stage.name) if stage.reference \
        else start
    tok = loading.load_tokenizer(start, ctx.recipe.model)
    train_pairs, eval_pairs = prepare_pairs(ctx, stage, tok, seed)
    ctx.log(f"  {len(train_pairs)} training pairs, {len(eval_pairs)} held out; loss "
            f"{stage.loss} β={stage.beta}" + (f" γ={stage.gamma}"
                                              if losses.get(stage.loss).takes_gamma else ""))
    model = ctx.runtime.model(loading.load_model(start, ctx.recipe.model))
    summary, state_dict = train_preference(ctx, stage, tok, model, train_pairs, eval_pairs,
                                           ref_path, ctx.stage_dir(stage.name), seed=seed,
                                           desc=stage.name)
    if ctx.runtime.is_main:
        loading.save_pretrained(model, tok, ctx.model_dir(stage.name),
                                state_dict=state_dict)
    ctx.runtime.wait()
    summary["reference"] = ref_path
    return summary
