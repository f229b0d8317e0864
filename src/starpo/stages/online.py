"""The online stage: iterative DPO (sample → judge → best-vs-worst pairs → train), in rounds.

Round ``k`` (1-based) of a stage named ``online`` lives in ``DIR/online/round_<k>/``::

    sampled.partial.jsonl   while the round samples: the samples of each finished chunk
                    of prompts (a preempted or killed round continues after the last)
    samples.jsonl   one line per prompt: the prompt, its n samples with judge scores,
                    token counts and whether each ended with an end-of-turn token, and
                    the selected pair (sample indices) or why the prompt was dropped
    pairs.jsonl     one line per selected pair: prompt, chosen, rejected, their scores,
                    margin (what the round trains on, before tokenization)
    judged.json     sampling/judging statistics; written last, so on a rerun a round whose
                    samples were judged is not sampled again
    metrics.jsonl   the round's training log (the shared loop's)
    model/          the policy after the round (a Hugging Face checkpoint)
    round.json      the round's summary; its presence marks the round finished

and the stage directory gets ``rounds.jsonl`` (one summary per finished round: mean judge
score of the samples, pairs kept, ties and identical-sample prompts dropped, training
loss and reward accuracy, seconds per phase), ``metrics.jsonl`` (every round's training
log, with ``round`` and a global ``step``) and ``model/`` (the last round's policy,
hard-linked when the file system allows).

Policy and reference
    Round 1 starts from ``stage.model`` (default: the previous trained stage, e.g.
    ``dpo``), round k from round k−1's saved model. ``reference_mode: round_start`` uses
    the policy at the start of the round as the reference (iterative DPO);
    ``fixed`` uses ``stage.reference`` or, if unset, the stage's starting model. Either
    way the reference is a saved checkpoint, so the reference log-prob cache keys it by
    content.

Resuming
    A finished round (``round.json`` and ``model/``) is skipped on rerun; a round killed
    during training reuses its judged pairs and resumes from its last loop checkpoint.
    A round's loop checkpoints are deleted once its model is saved (and verified).
    Sampling (one process) goes in chunks of prompts, each a whole number of the
    backend's batches in the order the backend would batch them anyway, so the chunks
    draw exactly the samples one call would; a round stopped while sampling continues at
    the first unfinished chunk (no prompt sampled twice, none skipped). Judging is
    deterministic and is redone from the saved samples.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from starpo.stages import online_rounds as O
from starpo.errors import StarpoError
from starpo import fileio
from starpo.data.sources import load_mixture
from starpo.data.sources import split_eval
from starpo.generate.backends import make_backend
from starpo.generate.sampling import GenerationStats, Generations, Sample, render_prompt
from starpo.judges import make_judge
from starpo.model import loading
from starpo.runtime import release_memory
from starpo.stages.preference import tokenize_pairs, train_preference
from starpo.train import preempt
from starpo.train.checkpoint import verify_model_dir

SAMPLED_PARTIAL = "sampled.partial.jsonl"
# a sampling chunk holds at least this many of the backend's batches
CHUNK_BATCHES = 8


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the checkpoint ``src`` (files hard-linked when possible,
    so the last round's weights are not stored twice), replaced atomically."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    fileio.atomic_dir(dst, lambda tmp: shutil.copytree(src, tmp, copy_function=link,
                                                       dirs_exist_ok=True))


def _combined_metrics(stage_dir: Path, rounds: int) -> list[dict]:
    """Every finished round's training log, with ``round``, ``round_step`` and a ``step``
    counted across rounds."""
    out, offset = [], 0
    for k in range(1, rounds + 1):
        path = stage_dir / f"round_{k}" / "metrics.jsonl"
        if not path.is_file():
            continue
        last = 0
        for rec in fileio.read_jsonl(path):
            last = max(last, int(rec.get("step", 0)))
            out.append({**rec, "round": k, "round_step": rec.get("step"),
                        "step": offset + int(rec.get("step", 0))})
        summary = stage_dir / f"round_{k}" / "round.json"
        steps = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
        offset += int(steps) if steps else last
    return out


def run_online(ctx, stage) -> dict:

    seed = ctx.seed_for(stage)
    stage_dir = ctx.stage_dir(stage.name)
    start = ctx.resolve_model(stage.model, before=stage.name)
    fixed_ref = None
    if stage.reference_mode == "fixed":
        fixed_ref = ctx.resolve_model(stage.reference, before=stage.name) if stage.reference \
            else start
    elif stage.reference:
        ctx.log(f"  note: reference {stage.reference!r} is ignored with reference_mode "
                "round_start (the policy at the start of each round is the reference)")
    rows = load_mixture(stage.data, "prompt", world_seed=ctx.recipe.world.seed, seed=seed,
                        log=ctx.log)
    if not rows:
        raise StarpoError(f"stage {stage.name}: the data gave no prompt")
    per_round = stage.prompts_per_round
    if per_round is not None and per_round > len(rows):
        ctx.log(f"  prompts_per_round {per_round} > {len(rows)} prompts: every round uses all")
    ctx.log(f"  {stage.rounds} round(s) × {min(per_round or len(rows), len(rows))} prompts × "
            f"{stage.n_samples} samples; judge {stage.judge.type}"
            f"{' ' + stage.judge.path if stage.judge.path else ''}; pairs "
            f"{stage.pair_selection}; loss {stage.loss} β={stage.beta}; reference "
            f"{stage.reference_mode}")

    policy_path = start
    summaries = []
    for k in range(1, stage.rounds + 1):
        rdir = stage_dir / f"round_{k}"
        done = rdir / "round.json"
        if done.is_file() and (rdir / "model" / "config.json").is_file():
            ctx.log(f"  round {k}: complete, skipped")
            summaries.append(json.loads(done.read_text()))
            policy_path = str(rdir / "model")
            continue
        ref_path = fixed_ref or policy_path
        summary = run_round(ctx, stage, k, rows, policy_path, ref_path, rdir, seed=seed)
        summaries.append(summary)
        policy_path = str(rdir / "model")
        if ctx.runtime.is_main:
            fileio.write_jsonl(stage_dir / "rounds.jsonl", summaries)
        if k < stage.rounds:
            preempt.check(f"{stage.name} round {k} (finished)", when="after")
    if ctx.runtime.is_main:
        fileio.write_jsonl(stage_dir / "rounds.jsonl", summaries)
        fileio.write_jsonl(stage_dir / "metrics.jsonl", _combined_metrics(stage_dir, stage.rounds))
        _link_or_copy_tree(Path(policy_path), ctx.model_dir(stage.name))
    ctx.runtime.wait()
    keys = ("mean_score", "pairs_selected", "pairs_trained", "dropped_ties",
            "dropped_identical", "steps")
    return {"start": start, "rounds": [{k: s.get(k) for k in ("round",) + keys}
                                       for s in summaries],
            "mean_score_first": summaries[0].get("mean_score"),
            "mean_score_last": summaries[-1].get("mean_score")}


def run_round(ctx, stage, k: int, rows: list[dict], policy_path: str, ref_path: str,
              rdir: Path, *, seed: int) -> dict:
    """One round: sample, judge, select, train; returns the round's summary."""

    rseed = O.round_seed(seed, k)
    timer = O.Timer()
    rt = ctx.runtime
    rdir.mkdir(parents=True, exist_ok=True)
    tok = loading.load_tokenizer(policy_path, ctx.recipe.model)

    def load_policy():
        # on the process's device from the start: sampling comes before the loop moves it
        return rt.model(loading.load_model(policy_path, ctx.recipe.model, device=rt.device,
                                           tokenizer=tok))

    # the hf backend samples the policy in memory (loaded once for sampling and training);
    # vllm samples the saved checkpoint, and the policy is loaded only after vLLM has given
    # its GPU memory back
    model = load_policy() if stage.generation.backend == "hf" else None

    judged = rdir / "judged.json"
    if judged.is_file() and (rdir / "pairs.jsonl").is_file() and \
            (rdir / "samples.jsonl").is_file():
        ctx.log(f"  round {k}: reusing judged samples from {rdir}")
        samples = fileio.read_jsonl(rdir / "samples.jsonl")
        pairs = fileio.read_jsonl(rdir / "pairs.jsonl")
        info = json.loads(judged.read_text())
    else:
        # each process samples and judges its block of the round's prompts; the blocks
        # are gathered on every process (which then select the same pairs); the main
        # process writes them
        samples, info = _sample_and_judge(ctx, stage, k, rows, model, tok, seed, timer,
                                          policy_path=policy_path)
        pairs = O.pair_records(samples)
        if rt.is_main:
            fileio.write_jsonl(rdir / "samples.jsonl", samples)
            fileio.write_jsonl(rdir / "pairs.jsonl", pairs)
            fileio.write_json(judged, info)
            (rdir / SAMPLED_PARTIAL).unlink(missing_ok=True)
    stats = O.round_statistics(samples, pairs)
    ctx.log(f"  round {k}: mean judge score {_fmt(stats['mean_score'])} over "
            f"{stats['samples']} samples; {stats['pairs_selected']} pairs from "
            f"{stats['prompts']} prompts (dropped {stats['dropped_ties']} ties, "
            f"{stats['dropped_identical']} identical); mean margin "
            f"{_fmt(stats['mean_margin'])}")

    if model is None:
        model = load_policy()
    t0 = time.time()
    pref_rows = O.preference_rows(pairs, source=f"{stage.name}/round_{k}")
    train_pairs, _ = tokenize_pairs(tok, pref_rows, stage, on_bad_rows="skip",
                                    progress=ctx.progress, log=ctx.log)
    train_pairs, eval_pairs = split_eval(train_pairs, stage.data.eval_fraction, rseed)
    summary = {"round": k, "seed": rseed, "policy": policy_path, "reference": ref_path,
               **stats, "dropped_tokenize": len(pairs) - len(train_pairs) - len(eval_pairs),
               "pairs_trained": len(train_pairs), "eval_pairs": len(eval_pairs),
               "sampling": info.get("sampling"), "judge": info.get("judge")}
    state_dict = None
    if train_pairs:
        res, state_dict = train_preference(ctx, stage, tok, model, train_pairs, eval_pairs,
                                           ref_path, rdir, seed=rseed,
                                           desc=f"{stage.name} round {k}")
        summary.update(steps=res.get("steps"), reference_cache_hit=res.get(
            "reference_cache_hit"), final=res.get("final"))
        for key in ("eval_before", "eval_after"):
            if key in res:
                summary[key] = res[key]
    else:
        ctx.log(f"  round {k}: WARNING no usable pair (every prompt tied or identical): the "
                "policy is carried over untrained; raise temperature or n_samples")
        summary.update(steps=0)
    timer.add("training", t0)
    t0 = time.time()
    if rt.is_main:
        loading.save_pretrained(model, tok, rdir / "model", state_dict=state_dict)
        why = verify_model_dir(rdir / "model")
        if why is not None:     # keep the loop checkpoints: the round can be saved again
            raise StarpoError(f"{rdir / 'model'}: the saved model is damaged ({why}); "
                              f"rerun the same command to save it again")
        shutil.rmtree(rdir / "checkpoints", ignore_errors=True)
    timer.add("saving", t0)
    summary["seconds"] = {**info.get("seconds", {}), **timer.seconds}
    if rt.is_main:
        fileio.write_json(rdir / "round.json", summary)
        fileio.write_jsonl(rdir.parent / "metrics.jsonl", _combined_metrics(rdir.parent, k))
    rt.wait()   # the next round loads this round's model
    del model
    release_memory()
    return summary


def _sample_and_judge(ctx, stage, k, rows, model, tok, seed, timer, *, policy_path):

    # the prompt permutation is the stage's (rounds take consecutive blocks of it); the
    # samples and the pair draws are the round's
    rt = ctx.runtime
    rseed = O.round_seed(seed, k)
    idx = O.round_prompt_indices(len(rows), stage.prompts_per_round, k, seed)
    round_rows = [rows[i] for i in idx]
    prompts = [r["prompt"] for r in round_rows]
    t0 = time.time()
    backend = make_backend(stage.generation, model=model, tokenizer=tok, path=policy_path,
                           runtime=rt)
    if rt.distributed:   # sharded across the processes by generate itself, in one call
        gens = O.sample_responses(model, tok, prompts, stage.generation, n=stage.n_samples,
                                  seed=rseed, progress=ctx.progress,
                                  desc=f"round {k} sampling", backend=backend, runtime=rt)
    else:
        gens = _sample_resumable(ctx, stage, k, prompts, tok, backend, rseed,
                                 rdir=ctx.stage_dir(stage.name) / f"round_{k}")
    del backend
    timer.add("sampling", t0)
    t0 = time.time()
    judge = make_judge(stage.judge, resolve_path=ctx.resolver(stage),
                       model_spec=ctx.recipe.model, device=rt.device)
    # judged in blocks like the sampling: each process scores its block's groups
    block = rt.shard(len(prompts))
    scores = rt.gather(O.judge_groups(
        judge, [prompts[i] for i in block], [[s.text for s in gens[i]] for i in block],
        progress=ctx.progress, chunk_prompts=max(1, stage.judge.batch_size),
        desc=f"{stage.name} round {k} judging"))
    source = getattr(judge, "source", getattr(judge, "name", stage.judge.type))
    del judge
    release_memory()
    timer.add("judging", t0)
    choices = O.select_pairs([[s.text for s in g] for g in gens], scores,
                             mode=stage.pair_selection, seed=rseed)
    samples = O.sample_records(k, round_rows, gens, scores, choices)
    info = {"sampling": gens.stats.as_dict(), "judge": str(source),
            "seconds": dict(timer.seconds)}
    return samples, info


def chunk_prompts(n_samples: int, batch_size: int) -> int:
    """Prompts per sampling chunk: their ``n_samples`` rows are a whole number (at least
    ``CHUNK_BATCHES``) of batches of ``batch_size`` rows, so a chunk's batches are the ones
    the backend forms over all prompts."""
    unit = math.lcm(n_samples, batch_size)
    return unit * max(1, math.ceil(CHUNK_BATCHES * batch_size / unit)) // n_samples


def _read_sampled(path: Path, setup: dict, log) -> dict[int, dict]:
    """The finished chunks of ``sampled.partial.jsonl`` made with ``setup``: chunk →
    ``{"records": [...], "stats": {...}}`` (a chunk counts once its end line is there)."""
    recs = fileio.read_jsonl(path)
    if not recs:
        return {}
    if recs[0].get("setup") != setup:
        log(f"  {path.name} was made with other settings; sampling the round again")
        return {}
    chunks: dict[int, dict] = {}
    for r in recs[1:]:
        c = chunks.setdefault(int(r["chunk"]), {"records": [], "stats": None})
        if "end" in r:
            c["stats"] = r["end"]
        else:
            c["records"].append(r)
    return {c: v for c, v in chunks.items() if v["stats"] is not None}


def _sample_resumable(ctx, stage, k: int, prompts: list, tok, backend, seed: int, *,
                      rdir: Path) -> Generations:
    """``n_samples`` samples per prompt, drawn chunk by chunk (:func:`chunk_prompts`) with
    each prompt's own random stream (its index), each finished chunk appended to
    ``sampled.partial.jsonl``; chunks found there are not sampled again. A preemption
    signal stops it after a chunk."""
    spec, n = stage.generation, stage.n_samples
    # the backend batches rows in order of prompt length (stable): chunks of that order
    lengths = [len(render_prompt(tok, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    per = chunk_prompts(n, spec.batch_size)
    chunks = [order[c:c + per] for c in range(0, len(order), per)]
    path = rdir / SAMPLED_PARTIAL
    setup = {"seed": seed, "n": n, "prompts": len(prompts), "chunk": per,
             "generation": spec.model_dump(mode="json")}
    done = _read_sampled(path, setup, ctx.log)
    if done:
        ctx.log(f"  round {k}: reusing the samples of {len(done)} of {len(chunks)} chunks "
                f"from {path.name}")
    else:
        fileio.write_jsonl(path, [{"setup": setup}])
    results: list[list[Sample] | None] = [None] * len(prompts)
    stats = GenerationStats()
    for c, idx in enumerate(chunks):
        if c in done:
            for r in done[c]["records"]:
                results[r["index"]] = [Sample(prompt_index=r["index"], **smp)
                                       for smp in r["samples"]]
            st = done[c]["stats"]
        else:
            gens = O.sample_responses(None, tok, [prompts[i] for i in idx], spec, n=n,
                                      seed=seed, progress=ctx.progress,
                                      desc=f"round {k} sampling {c + 1}/{len(chunks)}",
                                      backend=backend, indices=idx)
            for i, group in zip(idx, gens):
                for smp in group:
                    smp.prompt_index = i
                results[i] = list(group)
                fileio.append_jsonl(path, {"chunk": c, "index": i, "samples": [
                    {"text": s.text, "token_ids": s.token_ids, "num_tokens": s.num_tokens,
                     "finished": s.finished} for s in group]})
            st = {"sequences": gens.stats.sequences, "prompt_tokens": gens.stats.prompt_tokens,
                  "tokens": gens.stats.tokens, "seconds": gens.stats.seconds}
            fileio.append_jsonl(path, {"chunk": c, "end": st})
        for key in ("sequences", "prompt_tokens", "tokens", "seconds"):
            setattr(stats, key, getattr(stats, key) + st[key])
        if c + 1 < len(chunks) and preempt.requested() is not None:
            sampled = sum(len(x) for x in chunks[:c + 1])
            raise preempt.Preempted(
                f"{stage.name} round {k}: preempted ({preempt.requested()}) after sampling "
                f"{sampled} of {len(prompts)} prompts; samples saved ({path}); rerun the "
                f"same command to resume")
    return Generations(results, stats)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
