"""The eval stage: sample every model of the run once per evaluation prompt, judge the
responses, and write ``DIR/<stage>/summary.json`` and ``DIR/<stage>/<model>.jsonl``
(``DIR/eval/`` for the default stage name). The metrics are :mod:`starpo.metrics.evaluation`'s.

``starpo eval RUN_DIR`` (:func:`starpo.run.pipeline.evaluate_run`) runs the same on an
existing run directory.

Under ``accelerate launch`` with several processes every process samples, judges and
scores a block of the prompts on its own device; the blocks are gathered and the main
process writes the files (:func:`starpo.metrics.evaluation.evaluate_models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from starpo import fileio
from starpo.data.sources import load_mixture
from starpo.errors import StarpoError
from starpo.judges import make_judge
from starpo.metrics.evaluation import EvalResult, brief, evaluate_models
from starpo.recipe import DataSpec, EvalStage, SourceSpec, graph
from starpo.report.charts import signed


def run_eval(ctx, stage: EvalStage) -> dict:
    res = run_evaluation(ctx, stage)
    headline = brief(res.summary)
    for name, m in headline.items():
        parts = [f"{k} {v:.3f}" for k, v in m.items() if v is not None]
        ctx.log(f"  {name}: " + ", ".join(parts))
    for line in gap_lines(res.gaps):
        ctx.log(f"  {line}")
    return {"models": list(res.summary), "reference": res.reference,
            "prompts": res.meta["prompts"], "metrics": headline, "gaps": res.gaps}


def gap_lines(gaps: list[dict]) -> list[str]:
    """``gap online − dpo +0.031 [+0.012, +0.050] (665 prompts, paired)`` per gap."""
    out = []
    for g in gaps:
        if g["gap"] is None:
            continue
        ci = g["gap_ci"]
        span = f" [{signed(ci[0])}, {signed(ci[1])}]" if ci and None not in ci else ""
        out.append(f"gap {g['model']} − {g['baseline']} {signed(g['gap'])}{span} "
                   f"({g['n']} prompts, paired)")
    return out


def default_models(recipe, out: Path, stage=None, *,
                   log: Callable[[str], None] = print) -> list[str]:
    """The models ``stage`` evaluates (:func:`starpo.recipe.graph.eval_models`): its
    ``models``, else every policy stage in recipe order that has been trained in the run
    ``out`` (one whose model has not been written yet is left out, with a message)."""
    if stage is not None and stage.models:
        return graph.eval_models(recipe, stage)
    names = []
    for name in graph.policy_stages(recipe):
        path = graph.model_dir(out, name)
        if (path / "config.json").is_file():
            names.append(name)
        else:
            log(f"  {name}: no trained model at {path}; not evaluated")
    return names


def display_name(ref: str) -> str:
    """How a checkpoint path is named in an evaluation: its directory's name, or its
    stage's for a run's ``<stage>/model``."""
    p = Path(ref)
    if p.name == "model" and p.parent.name:
        return p.parent.name
    return p.name or ref


def model_key(ref: str, stage_names: set[str]) -> str:
    """The name of model ``ref`` (a stage, ``base`` or a path) in ``summary.json``."""
    return ref if ref in stage_names or ref == graph.BASE else display_name(ref)


def run_evaluation(ctx, stage, *, models: list[str] | None = None, n: int | None = None,
                   out_dir: Path | None = None,
                   check: Callable[[dict], None] | None = None) -> EvalResult:
    """The eval stage's work on a :class:`~starpo.run.pipeline.RunContext` (also the CLI's).
    ``check(settings)`` sees the settings that ``meta.json`` will record (prompts, seed,
    bootstrap, generation, judge, judge_source, reference) before anything is sampled,
    and may raise to stop. A model listed twice (by name and by path) is evaluated once."""
    recipe = ctx.recipe
    seed = ctx.seed_for(stage)
    names = models or default_models(recipe, ctx.out, stage, log=ctx.log)
    if not names:
        raise StarpoError("eval: no trained model to evaluate in this run; train a stage "
                          "first or list models (a stage name, 'base' or a checkpoint path)")
    stage_names = set(graph.names(recipe))
    resolved: dict[str, str] = {}
    for ref in names:
        path = ctx.resolve_model(ref, before=stage.name)
        key = model_key(ref, stage_names)
        if key in resolved and resolved[key] == path:
            continue
        if key in resolved:
            key = fileio.safe_name(ref)
        resolved[key] = path
    sft = graph.sft_reference(recipe, stage)
    if sft not in resolved:
        try:
            sft_path = ctx.resolve_model(sft, before=stage.name)
        except StarpoError as err:
            ctx.log(f"  no SFT reference ({err}); win_vs_sft and kl_vs_sft are left out")
            sft = None
        else:
            same = [k for k, p in resolved.items() if _same_path(p, sft_path)]
            if same:     # the recipe's model is the one evaluated (starpo eval MODEL_DIR)
                ctx.log(f"  no SFT reference other than {same[0]} itself; win_vs_sft and "
                        f"kl_vs_sft are left out")
                sft = None
            else:
                ctx.log(f"  {sft} is the SFT reference: it is sampled too")
                resolved = {sft: sft_path, **resolved}

    rows = load_mixture(stage.data, "prompt", world_seed=recipe.world.seed, seed=seed,
                        log=ctx.log)
    if n is not None:
        if len(rows) < n:
            ctx.log(f"  only {len(rows)} evaluation prompts available (asked for {n})")
        rows = rows[:n]
    if not rows:
        raise StarpoError("eval: the evaluation data gave no prompt")

    judge = make_judge(stage.judge, resolve_path=ctx.resolver(stage),
                       model_spec=recipe.model,
                       device=ctx.runtime.device)
    if check is not None:
        check({"prompts": len(rows), "seed": seed, "bootstrap": stage.bootstrap,
               "generation": stage.generation.model_dump(mode="json"),
               "judge": getattr(judge, "name", type(judge).__name__),
               "judge_source": getattr(judge, "source", None), "reference": sft})
    out_dir = out_dir or ctx.stage_dir(stage.name)
    ctx.log(f"  models {list(resolved)}; SFT reference {sft}; {len(rows)} prompts; judge "
            f"{stage.judge.type}")
    return evaluate_models(resolved, rows, judge, stage.generation, sft=sft, seed=seed,
                           bootstrap=stage.bootstrap, model_spec=recipe.model,
                           out_dir=out_dir, device=ctx.runtime.device, progress=ctx.progress,
                           log=ctx.log, meta={"stage": stage.name},
                           sample_cache=ctx.sample_cache, runtime=ctx.runtime)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def default_eval_stage(n: int | None = None):
    """The evaluation used when a run's recipe has no eval stage: the world's held-out
    prompts (``world:eval``, 200 unless ``n``), gold judge, the issue's sampling defaults."""
    return EvalStage(type="eval", name="eval",
                     data=DataSpec(sources=[SourceSpec(path="world:eval", n=n or 200)],
                                   shuffle=False))
