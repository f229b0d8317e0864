"""One response per evaluation prompt from a model, with the model's own log-probs of it,
and the on-disk cache of those samples.

The cache key is everything the samples depend on (the weights, the tokenizer and
generation files, the prompts, the sampling spec and seed, the loading spec, the device
type and torch version), so the trials of a sweep sample the shared SFT model once and a
model evaluated again by ``starpo eval`` is not sampled again. Entries are written
atomically: concurrent writers are safe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from starpo import fileio
from starpo.data.packing import collate_rows
from starpo.generate.sampling import generate, render_prompt
from starpo.model import loading
from starpo.model.logprobs import sequence_logprobs
from starpo.recipe import GenerationSpec
from starpo.runtime import Runtime, release_memory
from starpo.train.refcache import _file_sha, model_fingerprint


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


def load_for_sampling(ref: ModelRef, model_spec, device):
    """``(model, tokenizer, description)`` for a path or an in-memory pair."""
    if isinstance(ref, (tuple, list)):
        model, tok = ref
        return model, tok, getattr(getattr(model, "config", None), "_name_or_path", "in-memory")
    tok = loading.load_tokenizer(str(ref), model_spec)
    model = loading.load_model(str(ref), model_spec, for_training=False, device=device,
                                tokenizer=tok)
    return model, tok, str(ref)


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


def _vocab_key(tok) -> str:
    # a content hash (not Python's per-process salted hash()): it is stored in the cache
    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return f"{len(vocab)}:{hashlib.sha256(blob).hexdigest()[:16]}"


# files of a checkpoint directory that decide what it generates, besides its weights
_GEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json")


def sample_cache_key(ref: ModelRef, prompts: list[list[dict]], spec: GenerationSpec, *,
                     seed: int, model_spec=None, device=None) -> str | None:
    """What a model's evaluation samples depend on, hashed: its weights, tokenizer and
    generation config files, the prompts, the sampling spec and seed, the loading spec
    (dtype, attention) and the device type and torch version. ``None`` (no caching) for
    in-memory models and hub ids, whose content is not pinned here."""
    if isinstance(ref, (tuple, list)) or not Path(str(ref)).is_dir():
        return None
    p = Path(str(ref))
    h = hashlib.sha256(model_fingerprint(str(p)).encode())
    for name in _GEN_FILES:
        if (p / name).is_file():
            h.update(f"{name}:{_file_sha(p / name)}".encode())
    dev = Runtime.local(device).device.type
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


def sample_model(name: str, ref: ModelRef, prompts: list[list[dict]], spec: GenerationSpec, *,
                 seed: int, model_spec=None, device=None, chunk_size: int = 1024,
                 progress: bool = True, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None, runtime=None) -> ModelSamples:
    """Sample one response per prompt from ``ref`` and its own log-probs of them.

    With ``cache_dir``, the samples of a checkpoint directory are kept in
    ``cache_dir/samples-<key>.json`` (:func:`sample_cache_key`) and reused when nothing
    they depend on changed: the SFT reference that every trial of a sweep samples again,
    or a model evaluated again by ``starpo eval``.

    With a ``runtime`` of several processes (every one of them calls this), each samples
    and scores a block of the prompts (:func:`starpo.generate.sampling.generate` keeps the
    prompts' global random streams), the blocks are gathered on every process, and only
    the main process reads and writes the cache (its answer is broadcast, so the processes
    never disagree about a hit).
    """
    main = runtime is None or runtime.is_main
    if runtime is not None:
        device = runtime.device
    key = sample_cache_key(ref, prompts, spec, seed=seed, model_spec=model_spec,
                           device=device) if cache_dir is not None else None
    path = Path(cache_dir) / f"samples-{key}.json" if key is not None else None
    cached = None
    if main and path is not None and path.is_file():
        cached = _cache_read(path, name, str(ref))
        if cached is not None and len(cached.responses) != len(prompts):
            cached = None
    if runtime is not None:
        cached = runtime.broadcast(cached)
    if cached is not None:
        if log:
            log(f"    samples of {name}: cache hit ({path.name})")
        return cached
    block = runtime.shard(len(prompts)) if runtime is not None else range(len(prompts))
    local = [prompts[i] for i in block]
    if spec.backend == "vllm" and not isinstance(ref, (tuple, list)):
        # vLLM samples the checkpoint and gives its memory back; the HF model is loaded
        # after it, for the log-probs only
        from starpo.generate.backends import make_backend
        tok = loading.load_tokenizer(str(ref), model_spec)
        gens = generate(None, tok, local, spec, n=1, seed=seed, progress=progress,
                        desc=f"sampling {name}",
                        backend=make_backend(spec, tokenizer=tok, path=ref, runtime=runtime),
                        indices=list(block))
        model, tok, source = load_for_sampling(ref, model_spec, device)
    else:
        model, tok, source = load_for_sampling(ref, model_spec, device)
        gens = generate(model, tok, local, spec, n=1, seed=seed, progress=progress,
                        desc=f"sampling {name}", indices=list(block))
    dev = next(model.parameters()).device
    samples = [g[0] for g in gens]
    prompt_ids = [render_prompt(tok, p) for p in local]
    tokens = [list(s.token_ids) for s in samples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    logp = response_logprobs(model, prompt_ids, tokens, pad_id=pad,
                             batch_size=spec.batch_size, chunk_size=chunk_size, device=dev,
                             progress=progress, desc=f"log-probs {name}")
    del model
    release_memory()
    rows = list(zip([s.text for s in samples], tokens, prompt_ids,
                    [bool(s.finished) for s in samples], [float(x) for x in logp]))
    if runtime is not None:
        rows = runtime.gather(rows)
    ms = ModelSamples(name=name, source=source, responses=[r[0] for r in rows],
                      tokens=[r[1] for r in rows], prompt_ids=[r[2] for r in rows],
                      finished=[r[3] for r in rows], vocab_key=_vocab_key(tok),
                      logp=np.asarray([r[4] for r in rows], dtype=np.float64))
    if main and path is not None:
        _cache_write(path, ms)
    return ms
