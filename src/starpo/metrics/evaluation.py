"""The *PO guide's evaluation: gold score, win rates, KL to the SFT model, length.

Every model is asked each evaluation prompt once, with the same sampling seed (so two
models draw from the same random stream: identical models give identical samples), and
each response is scored by a pointwise judge (the world's gold reward, or a reward model).

Metrics (one value per model, each with a bootstrap 95% confidence interval over prompts;
each is an entry of :mod:`starpo.metrics.registry`, which computes them)::

    mean_score           mean_i gold(y_i)
    win_vs_chosen        mean_i w(gold(y_i), gold(chosen_i))          prompts with a reference
    win_vs_sft           mean_i w(gold(y_i), gold(y_i^sft))           same prompt, SFT's sample
        w(a, b) = 1 if a > b, ½ if a = b (or the two responses are the same text), 0 else;
        tie_vs_chosen / tie_vs_sft are the shares of ties.
    kl_vs_sft            mean_i Σ_t [log π(y_it | x_i, y_i<t) − log π_sft(y_it | x_i, y_i<t)]
    kl_vs_sft_per_token  mean_i (that sum / n_i)
    mean_length          mean_i length_i
    finished_rate        share of responses that ended their turn (not cut at max_new_tokens)

Tokens and lengths
    ``tokens`` are the sampled token ids themselves (never a re-tokenisation of the decoded
    text), through the end-of-turn token when the response finished; the KL sums run over
    all of them (ending the turn is part of what the policy chose), and ``n_i =
    len(tokens)``. ``length`` is the response's length as a reader sees it: the same
    tokens *without* the final end-of-turn token. So for a finished response ``n_i =
    length_i + 1``; dividing the KL by ``n_i`` keeps the per-token value defined for an
    empty response (just the end-of-turn token).

KL estimator
    Responses are sampled with the evaluation's temperature/top-p, but log-probs are the
    models' own distributions (temperature 1, no truncation), exactly as the guide
    measures it. The per-prompt value is a one-sample Monte-Carlo estimate, so single
    values can be negative; their mean estimates the KL. Both models score the same
    context ``render_prompt(tokenizer, prompt) + tokens`` (the policy's rendering). The SFT
    model evaluated against itself reuses its own log-probs, so its ``kl_vs_sft`` is 0
    exactly and its ``win_vs_sft`` ½ exactly (its samples are compared with themselves).

Bootstrap
    Percentile bootstrap of the mean over prompts: ``bootstrap`` resamples of the prompt
    indices with replacement from ``numpy.random.default_rng(seed)``; the same resamples
    serve every metric of a model over all prompts (``win_vs_chosen``, over the prompts
    with a reference, draws its own from the same seed). ``bootstrap=0`` gives no
    intervals (``None``).

Files written by :func:`evaluate_models` (``out_dir``)::

    summary.json      {model: {metric: value, metric_ci: [lo, hi], ...}}
    gaps.json         paired score gaps: [{model, baseline, n, gap, gap_ci}] for each model
                      against the one before it and against the SFT reference
                      (:func:`starpo.metrics.stats.score_gaps`)
    categories.json   only for prompts with a ``category`` (MT-Bench): {model: {category:
                      metrics}} (:func:`starpo.metrics.registry.by_category`)
    <model>.jsonl     one record per prompt (see :func:`_records`)
    meta.json         prompts, sampling spec, seed, judge, reference model

Samples come from :mod:`starpo.metrics.samples`, the metrics from
:mod:`starpo.metrics.registry` (on the statistics of :mod:`starpo.metrics.stats`); the
eval stage (:mod:`starpo.stages.eval`) runs this on a run's models, and ``starpo eval`` on
an existing run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from starpo import fileio
from starpo.canonical import as_messages, response_text
from starpo.errors import StarpoError
from starpo.judges.base import PairwiseJudge
from starpo.metrics import registry
from starpo.metrics.registry import by_category, summarize_model
from starpo.metrics.samples import (ModelRef, ModelSamples, load_for_sampling,
                                    response_logprobs, sample_model)
from starpo.metrics.stats import gap_pairs, kl_terms, score_gaps, win_outcomes
from starpo.recipe import GenerationSpec
from starpo.runtime import Runtime, release_memory


@dataclass
class EvalResult:
    summary: dict[str, dict]                 # model -> metrics (what summary.json holds)
    gaps: list[dict]                         # paired score gaps (what gaps.json holds)
    records: dict[str, list[dict]]           # model -> per-prompt records (<model>.jsonl)
    samples: dict[str, ModelSamples]
    reference: str | None
    meta: dict
    categories: dict[str, dict] | None = None   # model -> category -> metrics (MT-Bench)


def score_in_chunks(judge, prompts: Sequence, responses: Sequence[str], *, desc: str,
                    progress: bool, chunk: int = 256) -> list[float]:
    """``judge.score`` over chunks of ``chunk`` pairs, with a progress bar."""
    out: list[float] = []
    bar = tqdm(total=len(responses), desc=desc, unit="resp", disable=not progress, leave=False)
    try:
        for s in range(0, len(responses), chunk):
            vals = judge.score(list(prompts[s:s + chunk]), list(responses[s:s + chunk]))
            out.extend(float(v) for v in vals)
            bar.update(len(vals))
    finally:
        bar.close()
    return out


def _check_judge(judge) -> None:
    if isinstance(judge, PairwiseJudge):
        raise StarpoError("evaluation needs a judge that scores each response (judge.type "
                          "gold or reward_model); a pairwise judge has no absolute score")


def _prompt_messages(rows: Sequence[dict]) -> list[list[dict]]:
    out = []
    for i, r in enumerate(rows):
        r = r if isinstance(r, dict) else {}
        p = r.get("prompt")
        if isinstance(p, str):
            p = as_messages(p)
        if not isinstance(p, list) or not p:
            raise StarpoError(f"evaluation prompt {i} ({r.get('source', '?')}, row "
                              f"{r.get('row', i)}) has no 'prompt' messages")
        out.append(p)
    return out


def _chosen_texts(rows: Sequence[dict]) -> list[str | None]:
    out: list[str | None] = []
    for r in rows:
        ch = r.get("chosen") if isinstance(r, dict) else None
        if isinstance(ch, str):
            out.append(ch)
        elif isinstance(ch, list) and ch:
            out.append(response_text(ch))
        else:
            out.append(None)
    return out


def evaluate_models(models: Mapping[str, ModelRef], prompts: Sequence[dict], judge,
                    spec: GenerationSpec | None = None, *, sft: str | None = None,
                    seed: int = 0, bootstrap: int = 1000, model_spec=None,
                    out_dir: str | Path | None = None, device=None, chunk_size: int = 1024,
                    progress: bool = True, log: Callable[[str], None] = print,
                    meta: dict | None = None, sample_cache: str | Path | None = None,
                    runtime=None) -> EvalResult:
    """Sample, judge and measure every model of ``models`` on ``prompts``.

    Args:
        models: name → checkpoint path / hub id, or a ``(model, tokenizer)`` pair.
        prompts: canonical prompt rows (``{"prompt": messages, "chosen": messages|None,
            "id": ...}``); ``chosen`` is the dataset's reference response.
        judge: a pointwise judge (``score(prompts, responses)``): ``GoldJudge`` or
            ``RewardModelJudge``.
        spec: sampling (default: temperature 0.7, top_p 0.9, 256 new tokens).
        sft: the name (a key of ``models``) of the reference for ``win_vs_sft`` and
            ``kl_vs_sft``; ``None``: those metrics are ``None``.
        seed: sampling seed (the same for every model) and bootstrap seed.
        bootstrap: resamples for the 95% intervals (0: none).
        out_dir: where to write ``summary.json``, ``<model>.jsonl`` and ``meta.json``.
        device: where the models run (the runtime's; default: CUDA when present).
        sample_cache: directory of cached samples (:func:`~starpo.metrics.samples.sample_model`);
            None: off.
        runtime: with several processes (all of them call this), sampling, judging and
            the log-probs are done in blocks of prompts, one per process, and gathered;
            only the main process writes ``out_dir`` and the cache. ``device`` is the
            runtime's.
    """
    spec = spec or GenerationSpec(temperature=0.7, top_p=0.9, max_new_tokens=256)
    if not models:
        raise StarpoError("evaluation: no model to evaluate")
    if sft is not None and sft not in models:
        raise StarpoError(f"evaluation: the SFT reference {sft!r} is not among the models "
                          f"{list(models)}")
    _check_judge(judge)
    messages = _prompt_messages(prompts)
    if not messages:
        raise StarpoError("evaluation: no prompt to evaluate")
    chosen = _chosen_texts(prompts)
    device = runtime.device if runtime is not None else Runtime.local(device).device
    block = runtime.shard(len(messages)) if runtime is not None else range(len(messages))
    gather = runtime.gather if runtime is not None else list
    order = ([sft] if sft is not None else []) + [m for m in models if m != sft]

    chosen_scores = gather(_score_references(judge, [messages[i] for i in block],
                                             [chosen[i] for i in block], progress))
    samples: dict[str, ModelSamples] = {}
    for name in order:
        log(f"  evaluating {name}: {len(messages)} prompts")
        ms = sample_model(name, models[name], messages, spec, seed=seed,
                          model_spec=model_spec, device=device, chunk_size=chunk_size,
                          progress=progress, cache_dir=sample_cache, log=log,
                          runtime=runtime)
        ms.scores = gather(score_in_chunks(judge, [messages[i] for i in block],
                                           [ms.responses[i] for i in block],
                                           desc=f"scoring {name}", progress=progress))
        samples[name] = ms
        log(f"    mean score {np.mean(ms.scores):.3f}, mean length "
            f"{np.mean(ms.lengths):.1f} tokens, finished {np.mean(ms.finished):.0%}")
    if sft is not None:
        _logprobs_under_sft(samples, order, sft, models[sft], spec, model_spec=model_spec,
                            device=device, chunk_size=chunk_size, progress=progress, log=log,
                            block=block, gather=gather)

    summary, records = _measure(models, samples, prompts, messages, chosen, chosen_scores,
                                sft=sft, bootstrap=bootstrap, seed=seed)
    gaps = score_gaps({n: samples[n].scores for n in models}, gap_pairs(list(models), sft),
                      n_boot=bootstrap, seed=seed)
    categories = {n: by_category(records[n], n_boot=bootstrap, seed=seed) for n in models}
    categories = {n: c for n, c in categories.items() if c} or None
    for line in category_lines(categories):
        log(line)
    meta_out = {"prompts": len(messages), "models": {n: samples[n].source for n in models},
                "reference": sft, "seed": seed, "bootstrap": bootstrap,
                "generation": spec.model_dump(mode="json"),
                "judge": getattr(judge, "name", type(judge).__name__),
                "judge_source": getattr(judge, "source", None),
                "length": "response tokens without the final end-of-turn token",
                **(meta or {})}
    if out_dir is not None and (runtime is None or runtime.is_main):
        write_outputs(Path(out_dir), summary, records, meta_out, gaps)
        if categories is not None:
            fileio.write_json(Path(out_dir) / "categories.json", categories)
    return EvalResult(summary=summary, gaps=gaps, records=records, samples=samples,
                      reference=sft, meta=meta_out, categories=categories)


def category_lines(categories: Mapping[str, Mapping[str, dict]] | None) -> list[str]:
    """A plain-text table of the mean score per category (rows) and model (columns)."""
    if not categories:
        return []
    names = list(categories)
    cats = sorted({c for per in categories.values() for c in per})
    lines = ["  mean score by category: " + " ".join(f"{n:>10}" for n in names)]
    for c in cats:
        cells = []
        for n in names:
            v = categories[n].get(c, {}).get("mean_score")
            cells.append(f"{v:>10.3f}" if v is not None else f"{'-':>10}")
        lines.append(f"    {c:<21}" + " ".join(cells))
    return lines


def _score_references(judge, messages, chosen, progress: bool) -> list[float | None]:
    """The judge's score of each prompt's dataset response (``None`` where it has none)."""
    has_chosen = [i for i, c in enumerate(chosen) if c is not None]
    chosen_scores: list[float | None] = [None] * len(messages)
    if has_chosen:
        vals = score_in_chunks(judge, [messages[i] for i in has_chosen],
                               [chosen[i] for i in has_chosen], desc="scoring references",
                               progress=progress)
        for i, v in zip(has_chosen, vals):
            chosen_scores[i] = v
    return chosen_scores


def _logprobs_under_sft(samples: dict[str, ModelSamples], order: list[str], sft: str,
                        sft_ref: ModelRef, spec: GenerationSpec, *, model_spec, device,
                        chunk_size: int, progress: bool, log: Callable[[str], None],
                        block: range | None = None, gather=list) -> None:
    """Every model's samples scored by the SFT model (its own log-probs are reused); this
    process scores the prompts of ``block`` (default all), ``gather`` joins the blocks."""
    ref_ms = samples[sft]
    ref_ms.logp_sft = ref_ms.logp.copy()
    others = [n for n in order if n != sft]
    compatible = [n for n in others if samples[n].vocab_key == ref_ms.vocab_key]
    for n in others:
        if n not in compatible:
            log(f"  warning: {n} has a different tokenizer from {sft}; its KL to SFT is "
                "not defined and is left out")
    if not compatible:
        return
    model, tok, _ = load_for_sampling(sft_ref, model_spec, device)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    block = block if block is not None else range(len(ref_ms.responses))
    for n in compatible:
        ms = samples[n]
        local = response_logprobs(model, [ms.prompt_ids[i] for i in block],
                                  [ms.tokens[i] for i in block], pad_id=pad,
                                  batch_size=spec.batch_size, chunk_size=chunk_size,
                                  device=dev, progress=progress,
                                  desc=f"log-probs {n} under {sft}")
        ms.logp_sft = np.asarray(gather([float(x) for x in local]), dtype=np.float64)
    del model
    release_memory()


def _measure(models, samples: dict[str, ModelSamples], prompts, messages, chosen,
             chosen_scores, *, sft: str | None, bootstrap: int, seed: int
             ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """``summary`` (model → metrics) and ``records`` (model → per-prompt records)."""
    summary: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    ref_ms = samples.get(sft) if sft is not None else None
    for name in models:  # the caller's order
        ms = samples[name]
        same_chosen = [c is not None and r.strip() == c.strip()
                       for r, c in zip(ms.responses, chosen)]
        kl = kl_terms(ms.logp, ms.logp_sft) if ms.logp_sft is not None else None
        if ref_ms is not None:
            sft_scores = ref_ms.scores
            # the same tokens, or the same text: a tie, whatever the judge's round-off
            same_sft = [a == b or ra.strip() == rb.strip() for a, b, ra, rb in
                        zip(ms.tokens, ref_ms.tokens, ms.responses, ref_ms.responses)]
        else:
            sft_scores, same_sft = None, None
        m = summarize_model(ms.scores, ms.lengths, ms.n_tokens, finished=ms.finished,
                            chosen_scores=chosen_scores, same_as_chosen=same_chosen,
                            sft_scores=sft_scores, same_as_sft=same_sft, kl=kl,
                            n_boot=bootstrap, seed=seed)
        m["model"] = ms.source
        summary[name] = m
        records[name] = _records(prompts, messages, ms, chosen, chosen_scores, ref_ms, kl,
                                 same_chosen, same_sft)
    return summary, records


def _records(rows, messages, ms: ModelSamples, chosen, chosen_scores, ref_ms, kl, same_chosen,
             same_sft) -> list[dict]:
    out = []
    lengths, n_tokens = ms.lengths, ms.n_tokens
    for i, msgs in enumerate(messages):
        row = rows[i] if isinstance(rows[i], dict) else {}
        rec: dict[str, Any] = {
            "id": row.get("id", f"{i}"), "prompt": msgs, "response": ms.responses[i],
            "score": ms.scores[i], "length": lengths[i], "n_tokens": n_tokens[i],
            "finished": ms.finished[i], "logp_policy": float(ms.logp[i]),
            "logp_sft": None if ms.logp_sft is None else float(ms.logp_sft[i]),
            "kl": None if kl is None else float(kl[i]),
            "chosen": chosen[i], "chosen_score": chosen_scores[i],
            "win_vs_chosen": None if chosen_scores[i] is None else float(
                win_outcomes([ms.scores[i]], [chosen_scores[i]], same=[same_chosen[i]])[0]),
            "sft_score": None if ref_ms is None else ref_ms.scores[i],
            "win_vs_sft": None if ref_ms is None else float(
                win_outcomes([ms.scores[i]], [ref_ms.scores[i]], same=[same_sft[i]])[0]),
            "tokens": ms.tokens[i],
        }
        if row.get("category") is not None:
            rec["category"] = row["category"]
        out.append(rec)
    return out


def write_outputs(out_dir: Path, summary: dict, records: dict[str, list[dict]],
                  meta: dict, gaps: list[dict] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, recs in records.items():
        fname = f"{fileio.safe_name(name)}.jsonl"
        names[name] = fname
        fileio.write_jsonl(out_dir / fname, recs)
    fileio.write_json(out_dir / "meta.json", {**meta, "files": names})
    if gaps is not None:
        fileio.write_json(out_dir / "gaps.json", gaps)
    fileio.write_json(out_dir / "summary.json", summary)


def brief(summary: Mapping[str, dict]) -> dict[str, dict]:
    """The contract metrics of a summary (what a stage summary / log line shows)."""
    keys = registry.sweep_names()
    return {name: {k: (None if m.get(k) is None else round(float(m[k]), 4)) for k in keys}
            for name, m in summary.items()}
