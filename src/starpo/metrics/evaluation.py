"""The *PO guide's evaluation: gold score, win rates, KL to the SFT model, length.

Every model is asked each evaluation prompt once, with the same sampling seed (so two
models draw from the same random stream: identical models give identical samples), and
each response is scored by a pointwise judge (the world's gold reward, or a reward model).

Metrics (one value per model, each with a bootstrap 95% confidence interval over prompts)::

    mean_score           mean_i gold(y_i)
    win_vs_chosen        mean_i w(gold(y_i), gold(chosen_i))          prompts with a reference
    win_vs_sft           mean_i w(gold(y_i), gold(y_i^sft))           same prompt, SFT's sample
        w(a, b) = 1 if a > b, ½ if a = b (or the two responses are the same text), 0 else;
        tie_vs_chosen / tie_vs_sft are the shares of ties.
    kl_vs_sft            mean_i Σ_t [log π(y_it | x_i, y_i<t) − log π_sft(y_it | x_i, y_i<t)]
    kl_vs_sft_per_token  mean_i (that sum / n_i)
    mean_length          mean_i length_i

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
    serve every metric of a model. ``bootstrap=0`` gives no intervals (``None``).

Files written by :func:`evaluate_models` (``out_dir``)::

    summary.json      {model: {metric: value, metric_ci: [lo, hi], ...}}
    <model>.jsonl     one record per prompt (see :func:`_records`)
    meta.json         prompts, sampling spec, seed, judge, reference model

:func:`evaluate_run` evaluates the models of an existing run directory (``starpo eval``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from starpo.recipe import GenerationSpec
from starpo.data.canonical import as_messages
from starpo.errors import StarpoError
from starpo import fileio
from starpo.metrics.names import EVAL_METRICS


# =========================================================================== pure metrics


def win_outcomes(a: Sequence[float], b: Sequence[float], *, same: Sequence[bool] | None = None,
                 tol: float = 0.0) -> np.ndarray:
    """Per-pair outcome of ``a`` against ``b``: 1.0 win, 0.5 tie, 0.0 loss.

    A tie is ``|a − b| <= tol``, or ``same[i]`` true (the two responses are the same text:
    a judge that batches inputs can give the same text scores that differ by float
    round-off, and the same text must not win against itself).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_outcomes: {a.shape} vs {b.shape}")
    tie = np.abs(a - b) <= tol
    if same is not None:
        tie |= np.asarray(same, dtype=bool)
    return np.where(tie, 0.5, np.where(a > b, 1.0, 0.0))


def win_rate(a: Sequence[float], b: Sequence[float], *, same: Sequence[bool] | None = None,
             tol: float = 0.0) -> tuple[float, float]:
    """``(win rate with ties counted ½, tie rate)`` of scores ``a`` against ``b``."""
    w = win_outcomes(a, b, same=same, tol=tol)
    if w.size == 0:
        return float("nan"), float("nan")
    return float(w.mean()), float((w == 0.5).mean())


def kl_terms(logp_policy: Sequence[float], logp_ref: Sequence[float]) -> np.ndarray:
    """Per-sample ``Σ_t log π − Σ_t log π_ref`` from per-sequence summed log-probs."""
    p = np.asarray(logp_policy, dtype=np.float64)
    r = np.asarray(logp_ref, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"kl_terms: {p.shape} vs {r.shape}")
    return p - r


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampled indices (with replacement), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, indices: np.ndarray | None = None
                 ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values``.

    ``indices`` (from :func:`bootstrap_indices`) may be given to share resamples between
    metrics; otherwise they are drawn from ``seed``. ``None`` when ``n_boot`` is 0 or
    there are no values.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or (indices is None and n_boot <= 0):
        return None
    if indices is None:
        indices = bootstrap_indices(v.size, n_boot, seed)
    if indices.shape[1] != v.size:
        raise ValueError("bootstrap_ci: indices were drawn for a different number of values")
    means = np.empty(indices.shape[0])
    step = max(1, 4_000_000 // max(v.size, 1))  # bound the [chunk, n] gather's memory
    for s in range(0, indices.shape[0], step):
        means[s:s + step] = v[indices[s:s + step]].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def length_quantiles(lengths: Sequence[int]) -> dict[str, float]:
    """min, p10, p25, median, p75, p90, max of response lengths (empty dict for none)."""
    v = np.asarray(lengths, dtype=np.float64)
    if v.size == 0:
        return {}
    qs = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"min": float(v.min()), "p10": float(qs[0]), "p25": float(qs[1]),
            "median": float(qs[2]), "p75": float(qs[3]), "p90": float(qs[4]),
            "max": float(v.max())}


def _finite_or_none(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def summarize_model(scores: Sequence[float], lengths: Sequence[int], n_tokens: Sequence[int], *,
                    finished: Sequence[bool] | None = None,
                    chosen_scores: Sequence[float | None] | None = None,
                    same_as_chosen: Sequence[bool] | None = None,
                    sft_scores: Sequence[float] | None = None,
                    same_as_sft: Sequence[bool] | None = None,
                    kl: Sequence[float] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All metrics of one model from its per-prompt values (see the module docstring).

    Prompts whose ``chosen_scores`` entry is ``None`` (no reference response) are left
    out of ``win_vs_chosen``; a metric whose inputs are missing is ``None``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        raise StarpoError("evaluation: no prompt to evaluate")
    idx = bootstrap_indices(n, n_boot, seed) if n_boot > 0 else None

    out: dict[str, Any] = {"n": n}

    def put(name: str, per_prompt: np.ndarray | None):
        if per_prompt is None or per_prompt.size == 0:
            out[name], out[f"{name}_ci"] = None, None
            return
        out[name] = _finite_or_none(float(per_prompt.mean()))
        sub = idx
        if sub is not None and per_prompt.size != n:  # a subset of prompts: its own resamples
            sub = bootstrap_indices(per_prompt.size, n_boot, seed)
        ci = bootstrap_ci(per_prompt, indices=sub) if sub is not None else None
        out[f"{name}_ci"] = None if ci is None else [_finite_or_none(ci[0]),
                                                     _finite_or_none(ci[1])]

    put("mean_score", scores)

    if chosen_scores is not None:
        has = np.array([c is not None for c in chosen_scores], dtype=bool)
        if has.any():
            ch = np.array([c for c in chosen_scores if c is not None], dtype=np.float64)
            same = None if same_as_chosen is None else np.asarray(same_as_chosen, bool)[has]
            w = win_outcomes(scores[has], ch, same=same)
            put("win_vs_chosen", w)
            put("tie_vs_chosen", (w == 0.5).astype(np.float64))
            out["n_chosen"] = int(has.sum())
        else:
            put("win_vs_chosen", None)
            put("tie_vs_chosen", None)
            out["n_chosen"] = 0
    else:
        put("win_vs_chosen", None)
        put("tie_vs_chosen", None)

    if sft_scores is not None:
        w = win_outcomes(scores, sft_scores, same=same_as_sft)
        put("win_vs_sft", w)
        put("tie_vs_sft", (w == 0.5).astype(np.float64))
    else:
        put("win_vs_sft", None)
        put("tie_vs_sft", None)

    n_tok = np.asarray(n_tokens, dtype=np.float64)
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)
        put("kl_vs_sft", kl)
        put("kl_vs_sft_per_token", kl / np.maximum(n_tok, 1.0))
    else:
        put("kl_vs_sft", None)
        put("kl_vs_sft_per_token", None)

    lengths_a = np.asarray(lengths, dtype=np.float64)
    put("mean_length", lengths_a)
    out["length_quantiles"] = length_quantiles(lengths)
    if finished is not None:
        put("finished_rate", np.asarray(finished, dtype=np.float64))
    return out


# =========================================================================== log-probs


@torch.no_grad()
def response_logprobs(model, prompt_ids: Sequence[Sequence[int]],
                      response_ids: Sequence[Sequence[int]], *, pad_id: int,
                      batch_size: int = 16, chunk_size: int = 1024, device=None,
                      progress: bool = False, desc: str = "log-probs") -> np.ndarray:
    """Σ_t log p(response_t | prompt, response_<t) for each (prompt, response), float64.

    Each sequence is ``prompt_ids + response_ids``, its targets the response tokens. The
    sequences are sorted by length and run as right-padded rows (``[B, L]`` padding mask,
    positions from 0) through :func:`starpo.model.logprobs.sequence_logprobs`, which works for
    every attention implementation; tests check it equals a plain forward.
    """
    from tqdm.auto import tqdm

    from starpo.data.packing import collate_rows
    from starpo.model.logprobs import sequence_logprobs

    if len(prompt_ids) != len(response_ids):
        raise ValueError("response_logprobs: one prompt per response")
    out = np.zeros(len(prompt_ids), dtype=np.float64)
    if device is None:
        device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                      leave=False):
            idx = [i for i in order[s:s + batch_size] if len(response_ids[i]) > 0]
            if not idx:
                continue
            rows = []
            for i in idx:
                p, r = list(prompt_ids[i]), list(response_ids[i])
                if not p:
                    raise ValueError("response_logprobs: an empty prompt has no position "
                                     "to predict the first response token from")
                rows.append([(p + r, [-100] * len(p) + r)])
            batch = collate_rows(rows, pad_id=pad_id, padded=True).to(device)
            sums, _, _ = sequence_logprobs(model, batch, chunk_size=chunk_size)
            for i, v in zip(idx, sums.double().cpu().tolist()):
                out[i] = v
    finally:
        model.train(was_training)
    return out


# =========================================================================== evaluation


ModelRef = Any  # a checkpoint path / hub id, or a (model, tokenizer) pair already loaded


@dataclass
class ModelSamples:
    """What one model produced on the evaluation prompts (index i = prompt i)."""

    name: str
    source: str
    responses: list[str]
    tokens: list[list[int]]
    prompt_ids: list[list[int]]
    finished: list[bool]
    scores: list[float] = field(default_factory=list)
    logp: np.ndarray | None = None          # under the model itself
    logp_sft: np.ndarray | None = None      # under the SFT reference
    vocab_key: Any = None                   # identifies the tokenizer (KL needs the same one)

    @property
    def n_tokens(self) -> list[int]:
        return [len(t) for t in self.tokens]

    @property
    def lengths(self) -> list[int]:
        return [len(t) - 1 if f and t else len(t) for t, f in zip(self.tokens, self.finished)]


@dataclass
class EvalResult:
    summary: dict[str, dict]                 # model -> metrics (what summary.json holds)
    records: dict[str, list[dict]]           # model -> per-prompt records (<model>.jsonl)
    samples: dict[str, ModelSamples]
    reference: str | None
    meta: dict


def _release_memory() -> None:
    """Give freed model memory back (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(ref: ModelRef, model_spec, device):
    """``(model, tokenizer, description)`` for a path or an in-memory pair."""
    if isinstance(ref, (tuple, list)):
        model, tok = ref
        return model, tok, getattr(getattr(model, "config", None), "_name_or_path", "in-memory")
    from starpo.model import loading
    tok = loading.load_tokenizer(str(ref), model_spec)
    model = loading.load_model(str(ref), model_spec, for_training=False, device=device,
                                tokenizer=tok)
    return model, tok, str(ref)


def _vocab_key(tok) -> str:
    # a content hash (not Python's per-process salted hash()): it is stored in the cache
    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return f"{len(vocab)}:{hashlib.sha256(blob).hexdigest()[:16]}"


# --------------------------------------------------------------------------- sample cache

# files of a checkpoint directory that decide what it generates, besides its weights
_GEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json")


def sample_cache_key(ref: ModelRef, prompts: list[list[dict]], spec: GenerationSpec, *,
                     seed: int, model_spec=None, device=None) -> str | None:
    """What a model's evaluation samples depend on, hashed: its weights, tokenizer and
    generation config files, the prompts, the sampling spec and seed, the loading spec
    (dtype, attention) and the device type and torch version. ``None`` (no caching) for
    in-memory models and hub ids, whose content is not pinned here."""
    from starpo.train.refcache import _file_sha, model_fingerprint
    if isinstance(ref, (tuple, list)) or not Path(str(ref)).is_dir():
        return None
    p = Path(str(ref))
    h = hashlib.sha256(model_fingerprint(str(p)).encode())
    for name in _GEN_FILES:
        if (p / name).is_file():
            h.update(f"{name}:{_file_sha(p / name)}".encode())
    dev = torch.device(device).type if device is not None else _default_device().type
    h.update(json.dumps({"prompts": prompts, "spec": spec.model_dump(mode="json"),
                         "seed": seed, "device": dev, "torch": torch.__version__,
                         "model": model_spec.model_dump(mode="json") if model_spec is not None
                         else None}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _cache_read(path: Path, name: str, source: str) -> ModelSamples | None:
    try:
        d = json.loads(path.read_text())
        return ModelSamples(name=name, source=source, responses=d["responses"],
                            tokens=d["tokens"], prompt_ids=d["prompt_ids"],
                            finished=d["finished"], logp=np.asarray(d["logp"], np.float64),
                            vocab_key=d["vocab_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None         # unreadable entry: sample again (and overwrite it)


def _cache_write(path: Path, ms: ModelSamples) -> None:
    # atomic: concurrent sweep trials may write the same entry
    fileio.write_json(path, {"responses": ms.responses, "tokens": ms.tokens,
                            "prompt_ids": ms.prompt_ids, "finished": ms.finished,
                            "logp": [float(x) for x in ms.logp], "vocab_key": ms.vocab_key},
                     indent=None)


def score_in_chunks(judge, prompts: Sequence, responses: Sequence[str], *, desc: str,
                    progress: bool, chunk: int = 256) -> list[float]:
    """``judge.score`` over chunks of ``chunk`` pairs, with a progress bar."""
    from tqdm.auto import tqdm
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
    from starpo.judges.base import PairwiseJudge
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
    from starpo.data.canonical import response_text
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


def sample_model(name: str, ref: ModelRef, prompts: list[list[dict]], spec: GenerationSpec, *,
                 seed: int, model_spec=None, device=None, chunk_size: int = 1024,
                 progress: bool = True, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> ModelSamples:
    """Sample one response per prompt from ``ref`` and its own log-probs of them.

    With ``cache_dir``, the samples of a checkpoint directory are kept in
    ``cache_dir/samples-<key>.json`` (:func:`sample_cache_key`) and reused when nothing
    they depend on changed: the SFT reference that every trial of a sweep samples again,
    or a model evaluated again by ``starpo eval``.
    """
    from starpo.generate.sampling import generate, render_prompt
    key = sample_cache_key(ref, prompts, spec, seed=seed, model_spec=model_spec,
                           device=device) if cache_dir is not None else None
    path = Path(cache_dir) / f"samples-{key}.json" if key is not None else None
    if path is not None and path.is_file():
        ms = _cache_read(path, name, str(ref))
        if ms is not None and len(ms.responses) == len(prompts):
            if log:
                log(f"    samples of {name}: cache hit ({path.name})")
            return ms
    model, tok, source = _load(ref, model_spec, device)
    dev = next(model.parameters()).device
    gens = generate(model, tok, prompts, spec, n=1, seed=seed, progress=progress,
                    desc=f"sampling {name}")
    samples = [g[0] for g in gens]
    prompt_ids = [render_prompt(tok, p) for p in prompts]
    ms = ModelSamples(name=name, source=source, responses=[s.text for s in samples],
                      tokens=[list(s.token_ids) for s in samples], prompt_ids=prompt_ids,
                      finished=[bool(s.finished) for s in samples], vocab_key=_vocab_key(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ms.logp = response_logprobs(model, prompt_ids, ms.tokens, pad_id=pad,
                                batch_size=spec.batch_size, chunk_size=chunk_size, device=dev,
                                progress=progress, desc=f"log-probs {name}")
    del model
    _release_memory()
    if path is not None:
        _cache_write(path, ms)
    return ms


def evaluate_models(models: Mapping[str, ModelRef], prompts: Sequence[dict], judge,
                    spec: GenerationSpec | None = None, *, sft: str | None = None,
                    seed: int = 0, bootstrap: int = 1000, model_spec=None,
                    out_dir: str | Path | None = None, device=None, chunk_size: int = 1024,
                    progress: bool = True, log: Callable[[str], None] = print,
                    meta: dict | None = None, sample_cache: str | Path | None = None
                    ) -> EvalResult:
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
        sample_cache: directory of cached samples (see :func:`sample_model`); None: off.
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
    device = device if device is not None else _default_device()
    order = ([sft] if sft is not None else []) + [m for m in models if m != sft]

    has_chosen = [i for i, c in enumerate(chosen) if c is not None]
    chosen_scores: list[float | None] = [None] * len(messages)
    if has_chosen:
        vals = score_in_chunks(judge, [messages[i] for i in has_chosen],
                               [chosen[i] for i in has_chosen], desc="scoring references",
                               progress=progress)
        for i, v in zip(has_chosen, vals):
            chosen_scores[i] = v

    samples: dict[str, ModelSamples] = {}
    for name in order:
        log(f"  evaluating {name}: {len(messages)} prompts")
        ms = sample_model(name, models[name], messages, spec, seed=seed,
                          model_spec=model_spec, device=device, chunk_size=chunk_size,
                          progress=progress, cache_dir=sample_cache, log=log)
        ms.scores = score_in_chunks(judge, messages, ms.responses, desc=f"scoring {name}",
                                    progress=progress)
        samples[name] = ms
        log(f"    mean score {np.mean(ms.scores):.3f}, mean length "
            f"{np.mean(ms.lengths):.1f} tokens, finished {np.mean(ms.finished):.0%}")

    # log-probs of every model's samples under the SFT model (the SFT model's own are reused)
    if sft is not None:
        ref_ms = samples[sft]
        ref_ms.logp_sft = ref_ms.logp.copy()
        others = [n for n in order if n != sft]
        compatible = [n for n in others if samples[n].vocab_key == ref_ms.vocab_key]
        for n in others:
            if n not in compatible:
                log(f"  warning: {n} has a different tokenizer from {sft}; its KL to SFT is "
                    "not defined and is left out")
        if compatible:
            model, tok, _ = _load(models[sft], model_spec, device)
            dev = next(model.parameters()).device
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            for n in compatible:
                ms = samples[n]
                ms.logp_sft = response_logprobs(model, ms.prompt_ids, ms.tokens, pad_id=pad,
                                                batch_size=spec.batch_size,
                                                chunk_size=chunk_size, device=dev,
                                                progress=progress,
                                                desc=f"log-probs {n} under {sft}")
            del model
            _release_memory()

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

    meta_out = {"prompts": len(messages), "models": {n: samples[n].source for n in models},
                "reference": sft, "seed": seed, "bootstrap": bootstrap,
                "generation": spec.model_dump(mode="json"),
                "judge": getattr(judge, "name", type(judge).__name__),
                "judge_source": getattr(judge, "source", None),
                "length": "response tokens without the final end-of-turn token",
                **(meta or {})}
    if out_dir is not None:
        write_outputs(Path(out_dir), summary, records, meta_out)
    return EvalResult(summary=summary, records=records, samples=samples, reference=sft,
                      meta=meta_out)


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
        out.append(rec)
    return out


def safe_name(name: str) -> str:
    """A file-name-safe form of a model name."""
    s = re.sub(r"[^\w.\-]+", "_", name).strip("._")
    return s or "model"


def write_outputs(out_dir: Path, summary: dict, records: dict[str, list[dict]],
                  meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, recs in records.items():
        fname = f"{safe_name(name)}.jsonl"
        names[name] = fname
        fileio.write_jsonl(out_dir / fname, recs)
    fileio.write_json(out_dir / "meta.json", {**meta, "files": names})
    fileio.write_json(out_dir / "summary.json", summary)


# =========================================================================== runs


def _stage_model_exists(out: Path, name: str) -> bool:
    return (out / name / "model" / "config.json").is_file()


def default_models(recipe, out: Path, *, log: Callable[[str], None] = print) -> list[str]:
    """Every trained (policy) stage of the run in recipe order: sft, dpo, online, ….

    Reward and eval stages are not policies. A stage whose model has not been written yet
    is left out (with a message).
    """
    names = []
    for st in recipe.stages:
        if not st.yields_policy:
            continue
        if _stage_model_exists(out, st.name):
            names.append(st.name)
        else:
            log(f"  {st.name}: no trained model at {out / st.name / 'model'}; not evaluated")
    return names


def reference_name(recipe, stage=None) -> str:
    """The SFT reference: ``stage.sft`` when the eval stage has that field and it is set,
    else the first stage of type ``sft``, else ``"base"`` (the recipe's starting model)."""
    explicit = getattr(stage, "sft", None) if stage is not None else None
    if explicit:
        return explicit
    for st in recipe.stages:
        if st.type == "sft":
            return st.name
    return "base"


def _display_name(ref: str) -> str:
    p = Path(ref)
    if p.name == "model" and p.parent.name:
        return p.parent.name
    return p.name or ref


def run_evaluation(ctx, stage, *, models: list[str] | None = None, n: int | None = None,
                   out_dir: Path | None = None, device=None) -> EvalResult:
    """The eval stage's work on a :class:`~starpo.run.pipeline.RunContext` (also the CLI's)."""
    from starpo.data.sources import load_mixture
    from starpo.judges import make_judge

    recipe = ctx.recipe
    seed = ctx.seed_for(stage)
    names = models or stage.models or default_models(recipe, ctx.out, log=ctx.log)
    if not names:
        raise StarpoError("eval: no trained model to evaluate in this run; train a stage "
                          "first or list models (a stage name, 'base' or a checkpoint path)")
    stage_names = {s.name for s in recipe.stages}
    resolved: dict[str, str] = {}
    for ref in names:
        path = ctx.resolve_model(ref, before=stage.name)
        key = ref if (ref in stage_names or ref == "base") else _display_name(ref)
        if key in resolved:
            key = safe_name(ref)
        resolved[key] = path
    sft = reference_name(recipe, stage)
    if sft not in resolved:
        try:
            sft_path = ctx.resolve_model(sft, before=stage.name)
        except StarpoError as err:
            ctx.log(f"  no SFT reference ({err}); win_vs_sft and kl_vs_sft are left out")
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

    def resolve_judge(path: str):
        if path in stage_names:
            return str(ctx.stage_dir(path) / "model")
        return None

    judge = make_judge(stage.judge, resolve_path=resolve_judge, model_spec=recipe.model)
    out_dir = out_dir or ctx.stage_dir(stage.name)
    ctx.log(f"  models {list(resolved)}; SFT reference {sft}; {len(rows)} prompts; judge "
            f"{stage.judge.type}")
    return evaluate_models(resolved, rows, judge, stage.generation, sft=sft, seed=seed,
                           bootstrap=stage.bootstrap, model_spec=recipe.model,
                           out_dir=out_dir, device=device, progress=ctx.progress,
                           log=ctx.log, meta={"stage": stage.name},
                           sample_cache=ctx.sample_cache)


def default_eval_stage(n: int | None = None):
    """The evaluation used when a run's recipe has no eval stage: the world's held-out
    prompts (``world:eval``, 200 unless ``n``), gold judge, the issue's sampling defaults."""
    from starpo.recipe import DataSpec, EvalStage, SourceSpec
    return EvalStage(type="eval", name="eval",
                     data=DataSpec(sources=[SourceSpec(path="world:eval", n=n or 200)],
                                   shuffle=False))


def evaluate_run(run_dir: str | Path, models: list[str] | None = None, n: int | None = None, *,
                 stage: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, report: bool = True) -> EvalResult:
    """Evaluate the models of the run in ``run_dir`` (``starpo eval RUN_DIR``).

    Uses the run's resolved recipe (``RUN_DIR/recipe.yaml``): its eval stage (``stage``
    names one when there are several) for data, judge, sampling and bootstrap, or
    :func:`default_eval_stage` when it has none. ``models`` (stage names, ``base`` or
    checkpoint paths) defaults to every trained stage; ``n`` caps the prompts. Writes
    ``RUN_DIR/<eval stage>/`` (``eval`` by default) and, with ``report``, the report.
    """
    from starpo.recipe import load_recipe
    from starpo.run.pipeline import RunContext

    run_dir = Path(run_dir)
    rpath = run_dir / "recipe.yaml"
    if not rpath.is_file():
        raise StarpoError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(rpath)
    evals = [s for s in recipe.stages if s.type == "eval"]
    if stage is not None:
        chosen = [s for s in evals if s.name == stage]
        if not chosen:
            raise StarpoError(f"{rpath}: no eval stage named {stage!r}; eval stages: "
                              f"{[s.name for s in evals]}")
        st = chosen[0]
    elif evals:
        st = evals[0]
    else:
        st = default_eval_stage(n)
    ctx = RunContext(recipe, run_dir, log=log, progress=progress)
    log(f"[{st.name}] eval → {run_dir / st.name}")
    res = run_evaluation(ctx, st, models=models, n=n, out_dir=run_dir / st.name)
    if report:
        from starpo.report.run_page import write_report
        log(f"report → {write_report(run_dir)}")
    return res


def brief(summary: Mapping[str, dict]) -> dict[str, dict]:
    """The headline metrics of a summary (what a stage summary / log line shows)."""
    return {name: {k: (None if m.get(k) is None else round(float(m[k]), 4)) for k in EVAL_METRICS}
            for name, m in summary.items()}
