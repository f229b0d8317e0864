"""What the preference stages (dpo, reward, online) share: their pairs, loaded and
tokenized once per key; the reference log-probs from the cache; and the training of a
policy on pairs with held-out accuracy before and after."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from starpo import losses
from starpo.data import prefbatch as PB
from starpo.data.prepare import fingerprint, prepared
from starpo.data.sources import load_mixture, split_eval
from starpo.data.tokenize import PairStats, TokenizedPair, tokenize_pair
from starpo.errors import BadRows, DataError
from starpo.model import loading
from starpo.model.layout import attention_note
from starpo.recipe import PreferenceSpec
from starpo.train.loop import run_loop
from starpo.train.preference import PreferenceTask, evaluate_pairs, one_row, row_tokens
from starpo.train.refcache import reference_logps_for, tokenizer_fingerprint


def tokenize_pairs(tokenizer, rows: list[dict], spec: PreferenceSpec, *, on_bad_rows: str,
                   progress: bool, log) -> tuple[list[TokenizedPair], PairStats]:
    stats, out, bad = PairStats(), [], BadRows(on_bad_rows, log, "bad pairs")
    for r in tqdm(rows, desc="tokenizing pairs", disable=not progress, leave=False):
        try:
            p = tokenize_pair(tokenizer, r, max_length=spec.max_length,
                              max_prompt_length=spec.max_prompt_length, stats=stats)
        except DataError as err:
            bad.handle(err)
            continue
        if p is not None:
            out.append(p)
    bad.report()
    if stats.dropped_empty or stats.dropped_identical or stats.truncated:
        log(f"  truncation: {stats.truncated} pairs truncated, dropped {stats.dropped_empty} "
            f"empty and {stats.dropped_identical} identical after truncation")
    return out, stats


def prepare_reference(ctx, stage, tok, pairs, ref_path: str, *, batch_size: int,
                      needed: list[int] | None = None):
    """Reference log-probs for ``pairs`` from the cache (computed on a miss); with
    ``needed``, for those pairs only (the rest NaN: :func:`reference_logps_for`)."""
    if not losses.needs_reference(stage.loss):
        return None, None, None
    if not stage.reference_cache:
        ctx.log("  reference_cache: false — reference log-probs go to a file of this stage "
                "only")
    cache_dir = ctx.refcache if stage.reference_cache else Path(ctx.out) / stage.name / \
        "refcache-tmp"
    ref = reference_logps_for(ref_path, tok, pairs, needed, cache_dir=cache_dir,
                          load_model=lambda: loading.load_model(ref_path, ctx.recipe.model,
                                                                for_training=False),
                          runtime=ctx.runtime,
                          batch_size=batch_size, chunk_size=stage.train.logprob_chunk_size,
                          prefix_sharing=stage.prefix_sharing, progress=ctx.progress,
                          max_tokens_per_row=row_tokens(stage),
                          compile=stage.train.compile, log=ctx.log)
    return ref.chosen, ref.rejected, ref


def train_preference(ctx, stage, tok, model, train_pairs, eval_pairs, ref_path: str,
                     out_dir: Path, *, seed: int, desc: str) -> tuple[dict, dict | None]:
    """Shared by the offline stage and each online round: ``(summary, state_dict)``, the
    second the whole trained weights under FSDP/DeepSpeed (for ``save_pretrained``), else
    None."""
    all_pairs = train_pairs + eval_pairs
    n = len(train_pairs)
    rows1 = one_row(model, stage)
    if stage.prefix_sharing or stage.padding_free:
        ctx.log(f"  {attention_note(model, prefix_shared=stage.prefix_sharing)}")
    mk = lambda ps, a, b, bs: PreferenceTask(
        ps, stage, batch_size=bs, pad_id=tok.pad_token_id, seed=seed,
        ref_chosen=a, ref_rejected=b, one_row=rows1)
    task = mk(train_pairs, None, None, stage.train.batch_size)
    # a run that reaches at most half of its pairs (max_steps) computes the reference
    # log-probs of those and the held-out ones only; one that reaches more computes them
    # all, as one entry in data order: it costs little more, serves any later run of the
    # same data whole, and keeps the numbers of runs made before this existed (a subset
    # packs pairs into other rows, which rounds differently in the last float bits)
    trained = task.trained_pairs(stage.train, ctx.runtime.num_processes)
    needed = None if 2 * len(trained) > n else trained + list(range(n, len(all_pairs)))
    rc, rr, ref = prepare_reference(ctx, stage, tok, all_pairs, ref_path,
                                    batch_size=max(stage.train.batch_size, 8), needed=needed)
    if rc is not None:
        task.ref_c, task.ref_r = rc[:n], rr[:n]
    held = mk(eval_pairs, rc[n:] if rc is not None else None,
              rr[n:] if rr is not None else None, 32) if eval_pairs else None
    saved = PB.tokens_saved([p.as_dict() for p in train_pairs]) if stage.prefix_sharing else {}
    summary: dict = {"pairs": n, "eval_pairs": len(eval_pairs),
                     "reference_cache_hit": bool(ref and ref.hit), "prefix_sharing": saved}
    if held is not None:
        summary["eval_before"] = evaluate_pairs(model, held, ctx.runtime,
                                                chunk_size=stage.train.logprob_chunk_size)
    res = run_loop(model, task, stage.train, out_dir, seed=seed, resume=not ctx.restart,
                   desc=desc, progress=ctx.progress, runtime=ctx.runtime, log=ctx.log)
    summary.update(steps=res.steps, final=res.last_metrics)
    if held is not None:
        summary["eval_after"] = evaluate_pairs(model, held, ctx.runtime,
                                               chunk_size=stage.train.logprob_chunk_size)
        ctx.log(f"  held-out reward accuracy {summary['eval_before']['reward_accuracy']:.3f} → "
                f"{summary['eval_after']['reward_accuracy']:.3f} ({len(eval_pairs)} pairs)")
    return summary, res.state_dict


def _pair_json(p: TokenizedPair) -> dict:
    return {**p.as_dict(), "source": p.source, "row": p.row}


def prepare_pairs(ctx, stage, tok, seed: int, *, transform=None,
                  transform_key: str | None = None
                  ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """The stage's preference data, loaded, split and tokenized once per key (main process
    first; reused on resume): ``(train_pairs, eval_pairs)``. Shared by the dpo, reward and
    pairwise_rm stages (``stage`` has ``data``, ``max_length`` and ``max_prompt_length``).

    ``transform`` (canonical rows → canonical rows, e.g. the pairwise model's joint
    layout) is applied after the held-out split, so the split is the one the other
    stages of the same data and seed hold out; ``transform_key`` names it in the cache key.
    """
    def build():
        rows = load_mixture(stage.data, "preference", world_seed=ctx.recipe.world.seed,
                            seed=seed, log=ctx.log)
        train_rows, eval_rows = split_eval(rows, stage.data.eval_fraction, seed)
        if transform is not None:
            train_rows, eval_rows = transform(train_rows), transform(eval_rows)
        kw = dict(on_bad_rows=stage.data.on_bad_rows, progress=ctx.progress, log=ctx.log)
        return {part: [_pair_json(p) for p in tokenize_pairs(tok, part_rows, stage, **kw)[0]]
                for part, part_rows in (("train", train_rows), ("eval", eval_rows))}

    key = fingerprint(stage.data.model_dump(mode="json"), tokenizer_fingerprint(tok), seed,
                      ctx.recipe.world.seed, stage.max_length, stage.max_prompt_length,
                      *([transform_key] if transform is not None else []))
    data = prepared(ctx.stage_dir(stage.name) / "data", "pairs", key, build, log=ctx.log,
                    runtime=ctx.runtime)
    train_pairs = [TokenizedPair(**d) for d in data["train"]]
    eval_pairs = [TokenizedPair(**d) for d in data["eval"]]
    if not train_pairs:
        raise DataError("no usable preference pair in the stage's data", source=stage.name)
    return train_pairs, eval_pairs
