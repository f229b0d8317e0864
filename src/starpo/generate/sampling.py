"""Batched sampling from a chat model: transformers ``generate`` with the KV cache.

What a caller gets: for every prompt (a list of chat messages) ``n`` :class:`Sample`s,
each holding the response's token ids and its decoded text. The rest of this docstring
says how, and why it is done that way.

Prompts
    :func:`render_prompt` renders the messages with the tokenizer's chat template
    (``add_generation_prompt=True``) and tokenizes the text with
    ``add_special_tokens=False``: the template already wrote any BOS, so there is never a
    double BOS.

Batching
    Every (prompt, sample) pair is one row. Rows are sorted by prompt length (stable, so a
    prompt's samples stay together), cut into batches of ``spec.batch_size`` rows, left
    padded (the new tokens of all rows then start at the same column, which is what
    decoder-only ``generate`` needs), and put back in prompt order at the end.
    ``generate`` derives position ids from the attention mask, so a left-padded row gets
    the same positions as the same prompt alone.

Decoders
    ``spec.decoder`` picks the loop that runs a batch: transformers ``generate`` (the
    default off CUDA, and the reference), or :mod:`starpo.generate.static` — a KV cache
    allocated once, sampling on the device, the decode step replayed as a CUDA graph on a
    GPU (the default there), in batches of ``spec.decode_batch_size`` rows (``auto``: as
    many as GPU memory holds). Same prompts, padding, positions, stop handling and draws;
    the tokens differ from ``generate``'s only where float round-off of the logits moves a
    draw.

Stopping
    A row stops at the chat template's end-of-turn token (found by rendering a tiny
    conversation, so it is ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3,
    ``<end_of_turn>`` for Gemma), at ``tokenizer.eos_token_id`` and at every id of the
    model's ``generation_config.eos_token_id``; see :func:`stop_token_ids`.

Sampling and seeds
    Temperature 0 is greedy decoding (argmax; no randomness at all). Otherwise the next
    token is drawn by :func:`sample_tokens` (temperature, then nucleus/top-p) inside a
    logits processor, and ``generate`` itself runs in greedy mode over the processor's
    one-hot output. The draw for a row uses one uniform number per step computed by a
    counter-based hash of ``(seed, prompt_index, sample_index, step)``; no torch random
    generator is used. Consequences:

    * the same seed gives the same samples, *whatever the batch size or the order and
      grouping of rows* (only float round-off of batched vs unbatched logits could ever
      move a draw that lies within ~1e-7 of a token boundary);
    * sample ``j`` of prompt ``i`` depends on ``i``, so reordering the prompt list changes
      which stream a prompt gets (keep the list order fixed for reproducibility);
    * the global torch RNG is left untouched, so sampling in the middle of training does
      not perturb the training run's random state.

    The model's own ``generation_config`` sampling defaults (temperature, top_k,
    repetition penalty, ...) are deliberately *not* applied: alignment code needs samples
    from the policy's distribution as the spec states it (KL estimates assume that).

Result
    ``Sample.token_ids`` are the response tokens up to *and including* the stop token when
    one was generated (``finished=True``), so they can be fed back for log-probs exactly as
    the SFT/DPO tokenization trains the end-of-turn token; without a stop token the row ran
    into ``max_new_tokens`` (``finished=False``). ``Sample.text`` is the decoded response
    without special tokens, stripped. :func:`generate` returns a :class:`Generations`, a
    plain ``list[list[Sample]]`` that also carries :class:`GenerationStats` (tokens,
    seconds, tokens/s) in ``.stats``; the same figures are logged at INFO level.

Backends
    :class:`Backend` is the interface; :class:`HFBackend` is the transformers
    implementation (the default, ``generation.backend: hf``) and
    :class:`starpo.generate.vllm.VLLMBackend` samples a saved checkpoint with vLLM
    (``generation.backend: vllm``, the ``[vllm]`` extra) under the same contract: prompts
    rendered by :func:`render_prompt`, the same stop ids, one seed per (prompt, sample)
    stream; :func:`starpo.generate.backends.make_backend` picks one from the spec.

Several processes
    With a :class:`~starpo.runtime.Runtime` of several processes, :func:`generate` gives
    each process a contiguous block of the prompts, each samples its block with the
    prompts' *global* indices as stream indices (``indices``), and the blocks are gathered
    in order on every process. Since a row's draws depend only on (seed, prompt index,
    sample index, step), the result is the one process would get, up to the float
    round-off named above (a block is batched and padded differently). One process:
    nothing changes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from transformers import LogitsProcessor

from starpo.recipe import GenerationSpec
from starpo.canonical import as_messages
from starpo.errors import StarpoError
from starpo.generate import static
# the random streams and the draw live in draws.py (the static decoders use them too);
# re-exported here, where callers have always found them
from starpo.generate.draws import (row_key, row_uniform, row_uniforms,  # noqa: F401
                                   sample_tokens)
from starpo.model.chat import stop_token_ids

logger = logging.getLogger(__name__)

Messages = list[dict]


# --------------------------------------------------------------------------- results

@dataclass
class Sample:
    prompt_index: int        # index of the prompt in the list given to generate()
    text: str                # decoded response, special tokens skipped, stripped
    token_ids: list[int]     # response tokens, through the stop token if one was generated
    num_tokens: int          # len(token_ids)
    finished: bool           # True if the response ended with an end-of-turn / stop token


@dataclass
class GenerationStats:
    sequences: int = 0
    prompt_tokens: int = 0
    tokens: int = 0          # generated (response) tokens, stop tokens included
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"sequences": self.sequences, "prompt_tokens": self.prompt_tokens,
                "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s}


class Generations(list):
    """``list[list[Sample]]`` (one inner list of ``n`` samples per prompt) plus ``stats``."""

    def __init__(self, items=(), stats: GenerationStats | None = None):
        super().__init__(items)
        self.stats = stats if stats is not None else GenerationStats()


# --------------------------------------------------------------------------- prompts

def render_prompt(tokenizer, messages) -> list[int]:
    """Token ids of ``messages`` rendered for generation (chat template + assistant header).

    A bare string is taken as one user message. The text is tokenized with
    ``add_special_tokens=False`` because the template writes BOS itself where the model
    wants one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise StarpoError("the tokenizer has no chat template, so prompts cannot be rendered "
                          "for generation; set model.chat_template in the recipe")
    text = tokenizer.apply_chat_template(as_messages(messages), tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise StarpoError("the chat template rendered an empty prompt")
    return ids


# --------------------------------------------------------------------------- sampling

class _SeededSampler(LogitsProcessor):
    """Logits processor that samples per row from its own counter-based stream.

    It returns scores that are ``-inf`` everywhere except the drawn token, so that
    ``generate`` in greedy mode emits exactly the drawn token.
    """

    def __init__(self, keys: list[int], start_len: int, temperature: float, top_p: float):
        self.keys, self.start_len = keys, start_len
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start_len
        u = torch.tensor([row_uniform(k, step) for k in self.keys], dtype=torch.float64,
                         device=scores.device)
        chosen = sample_tokens(scores, u, temperature=self.temperature, top_p=self.top_p)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, chosen.unsqueeze(-1), 0.0)
        return out


# --------------------------------------------------------------------------- backends

@runtime_checkable
class Backend(Protocol):
    """Something that samples chat responses; see the module docstring for the contract."""

    def generate(self, prompts: Sequence, spec: GenerationSpec, *, n: int = 1, seed: int = 0,
                 progress: bool = True, desc: str = "sampling",
                 indices: Sequence[int] | None = None) -> Generations: ...


class HFBackend:
    """Sampling with a transformers causal LM (any ``GenerationMixin`` model, peft too).

    ``spec.decoder`` picks the loop (:func:`starpo.generate.static.choose_decoder`):
    transformers' ``generate`` in batches of ``spec.batch_size`` rows, or the static-cache
    decoders of :mod:`starpo.generate.static` in batches of ``spec.decode_batch_size``
    rows. After a call, ``last_decoder`` says which ran, why, and how many rows a batch
    held (the timing helper of ``benchmarks.generation`` reports it).
    """

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.last_decoder: dict = {}

    def generate(self, prompts: Sequence, spec: GenerationSpec, *, n: int = 1, seed: int = 0,
                 progress: bool = True, desc: str = "sampling",
                 indices: Sequence[int] | None = None) -> Generations:
        from tqdm.auto import tqdm

        if n < 1:
            raise StarpoError(f"generate: n must be at least 1, got {n}")
        model, tok = self.model, self.tokenizer
        encoded = [render_prompt(tok, p) for p in prompts]
        streams = stream_indices(len(encoded), indices)
        stops = stop_token_ids(tok, model)
        if not stops:
            raise StarpoError("cannot tell where a response ends: the tokenizer has no eos "
                              "token and its chat template no end-of-turn token")
        stop_set = set(stops)
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
        device = _model_device(model)

        # one row per (prompt, sample); sort by prompt length for tight batches
        rows = [(i, j) for i in range(len(encoded)) for j in range(n)]
        rows.sort(key=lambda r: len(encoded[r[0]]))
        results: list[list[Sample | None]] = [[None] * n for _ in encoded]
        stats = GenerationStats()
        greedy = spec.temperature == 0

        choice = static.choose_decoder(spec.decoder, model, device)
        if choice.kind == "generate" or not rows:
            run_batch, per_batch, auto = self._generate_batch(spec, stops, pad, device), \
                spec.batch_size, False
        else:
            run_batch = static.BatchDecoders(
                model, cache_len=static.cache_length([len(x) for x in encoded],
                                                     spec.max_new_tokens),
                spec=spec, stops=stops, pad=pad, graph=choice.kind == "graph",
                check_every=static.GPU_CHECK_EVERY if device.type == "cuda" else 1)
            auto = spec.decode_batch_size == "auto"
            per_batch = static.auto_rows(
                model, rows=len(rows), prompt_len=max(len(x) for x in encoded),
                cache_len=run_batch.cache_len, device=device,
                fallback=spec.batch_size) if auto else spec.decode_batch_size
        logger.info("%s: %s, %d rows per batch", desc, choice.why, per_batch)

        was_training = model.training
        model.eval()
        bar = tqdm(total=len(rows), desc=desc, unit="seq", disable=not progress, leave=False)
        try:
            b = 0
            while b < len(rows):
                batch = rows[b: b + per_batch]
                ids = [encoded[i] for i, _ in batch]
                keys = None if greedy else [row_key(seed, streams[i], j) for i, j in batch]
                t0 = time.perf_counter()
                try:
                    new = run_batch(ids, keys)
                except torch.cuda.OutOfMemoryError:
                    if not auto or per_batch == 1:
                        raise
                    new = None
                if new is None:     # out of memory (the exception's frames are gone now)
                    run_batch.release()
                    per_batch = max(1, per_batch // 2)
                    logger.warning("%s: out of GPU memory; retrying with %d rows per batch",
                                   desc, per_batch)
                    continue
                stats.seconds += time.perf_counter() - t0
                for (i, j), toks in zip(batch, new):
                    resp, finished = _cut_at_stop(toks, stop_set)
                    text = tok.decode(resp, skip_special_tokens=True).strip()
                    results[i][j] = Sample(prompt_index=i, text=text, token_ids=resp,
                                           num_tokens=len(resp), finished=finished)
                    stats.tokens += len(resp)
                    stats.prompt_tokens += len(encoded[i])
                stats.sequences += len(batch)
                b += len(batch)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
        finally:
            bar.close()
            model.train(was_training)
            if isinstance(run_batch, static.BatchDecoders):
                self.last_decoder = {"decoder": choice.kind, "why": choice.why,
                                     "rows_per_batch": per_batch,
                                     "graph": run_batch.graph_status()}
                run_batch.release()
            else:
                self.last_decoder = {"decoder": choice.kind, "why": choice.why,
                                     "rows_per_batch": per_batch}
        logger.info("%s: %d sequences, %d new tokens in %.2fs (%.1f tokens/s)", desc,
                    stats.sequences, stats.tokens, stats.seconds, stats.tokens_per_s)
        return Generations(results, stats)

    def _generate_batch(self, spec: GenerationSpec, stops: list[int], pad: int, device):
        """``run(ids, keys) -> new tokens per row``: one transformers ``generate`` call over
        left-padded rows, sampling through :class:`_SeededSampler`."""
        from transformers import GenerationConfig, LogitsProcessorList

        model = self.model

        def run(ids: list[list[int]], keys: list[int] | None) -> list[list[int]]:
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):  # left padding
                input_ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
                attention[r, width - len(x):] = 1
            processors = LogitsProcessorList()
            if keys is not None:
                processors.append(_SeededSampler(keys, width, spec.temperature, spec.top_p))
            gen_cfg = GenerationConfig(
                max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1,
                use_cache=True, eos_token_id=stops, pad_token_id=pad,
                # neutral values, so the checkpoint's generation_config cannot add its own
                temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                no_repeat_ngram_size=0)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device),
                                     attention_mask=attention.to(device),
                                     generation_config=gen_cfg,
                                     logits_processor=processors)
            return out[:, width:].tolist()

        return run


def _cut_at_stop(tokens: list[int], stop_set: set[int]) -> tuple[list[int], bool]:
    for k, t in enumerate(tokens):
        if t in stop_set:
            return tokens[: k + 1], True
    # no stop token: the row ran to max_new_tokens, every column is a real token
    return tokens, False


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def stream_indices(n: int, indices: Sequence[int] | None) -> list[int]:
    """The random-stream index of each of ``n`` prompts: ``indices`` (their positions in
    a larger list this is a block of) or ``0..n-1``."""
    if indices is None:
        return list(range(n))
    if len(indices) != n:
        raise StarpoError(f"generate: {len(indices)} stream indices for {n} prompts")
    return [int(i) for i in indices]


def generate(model, tokenizer, prompts: Sequence, spec: GenerationSpec, *, n: int = 1,
             seed: int = 0, progress: bool = True, desc: str = "sampling",
             backend: Backend | None = None, runtime=None,
             indices: Sequence[int] | None = None) -> Generations:
    """Sample ``n`` responses for every prompt; ``result[i][j]`` is sample ``j`` of prompt ``i``.

    ``prompts`` are message lists (a bare string is one user message). ``spec`` gives
    temperature (0 = greedy), top_p, max_new_tokens and batch_size (rows per forward).
    The returned :class:`Generations` also has ``.stats`` (tokens, seconds, tokens/s).
    With a ``runtime`` of several processes the prompts are sharded across them and the
    result gathered (every process gets all of it; see the module docstring); every
    process must call this with the same prompts. ``indices`` (without a runtime) are the
    prompts' stream indices when they are a block of a larger list.
    """
    backend = backend if backend is not None else HFBackend(model, tokenizer)
    prompts = list(prompts)
    if runtime is None or not runtime.distributed:
        kw = {"indices": indices} if indices is not None else {}
        return backend.generate(prompts, spec, n=n, seed=seed, progress=progress, desc=desc,
                                **kw)
    if indices is not None:
        raise StarpoError("generate: pass either a runtime (which shards) or indices")
    block = runtime.shard(len(prompts))
    local = backend.generate([prompts[i] for i in block], spec, n=n, seed=seed,
                             progress=progress, desc=desc, indices=list(block))
    rows = runtime.gather(list(local))
    stats = runtime.gather([local.stats])
    for i, group in enumerate(rows):          # indices into the whole list again
        for smp in group:
            smp.prompt_index = i
    total = GenerationStats(sequences=sum(x.sequences for x in stats),
                            prompt_tokens=sum(x.prompt_tokens for x in stats),
                            tokens=sum(x.tokens for x in stats),
                            # the blocks are sampled at the same time: the slowest one counts
                            seconds=max(x.seconds for x in stats))
    return Generations(rows, total)
