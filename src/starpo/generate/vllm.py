"""Sampling with vLLM (``generation.backend: vllm``): online rounds and evaluation on GPUs.

Every model that an online round or the eval stage samples is a saved checkpoint already
(round k's policy is round k−1's ``model/``; eval samples each stage's ``model/``), so
the backend loads that directory into a ``vllm.LLM``, samples, and gives the GPU memory
back before anything else (the policy's training, the log-prob pass) needs it.

Same semantics as :class:`starpo.generate.sampling.HFBackend`
    * prompts are rendered by :func:`~starpo.generate.sampling.render_prompt` (chat
      template, generation prompt, no second BOS) and passed to vLLM as token ids, so both
      backends see the same input tokens;
    * ``temperature`` (0: greedy, one sample repeated ``n`` times), ``top_p``,
      ``max_new_tokens`` → ``SamplingParams(temperature, top_p, max_tokens)``; no top-k,
      no repetition penalty (vLLM's defaults are neutral, and explicit ``SamplingParams``
      are used as given: the checkpoint's generation defaults do not apply);
    * it stops at the same ids (:func:`starpo.model.chat.stop_token_ids`: end of turn,
      eos, the checkpoint's ``generation_config`` eos ids), and ``Sample.token_ids`` run
      through the stop token, as the HF backend's do;
    * one seed per prompt — a hash of (seed, the prompt's stream index) — so a prompt's
      samples do not depend on the batch it is in, on the other prompts, or on which
      process samples it. The draws themselves are vLLM's, so the two backends give
      different samples from the same distribution, not the same samples.
    * text is decoded here, from the token ids, like the HF backend's (special tokens
      skipped, stripped).

Several processes
    Each process of ``accelerate launch`` samples its block of prompts on its own GPU
    (:func:`starpo.generate.sampling.generate` shards and gathers): the engine is created
    with ``distributed_executor_backend="external_launcher"`` (vLLM then runs inside the
    launcher's processes instead of spawning its own) and one tensor-parallel rank.

Memory
    The engine is created with sleep mode; after sampling it is put to sleep at level 2
    (weights and KV cache freed), dropped, and the CUDA cache emptied.

Installing: ``pip install 'starpo[vllm]'`` (a CUDA machine). Without it, a recipe that asks
for the backend stops before any stage runs, with one line naming the extra.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Sequence

from starpo.errors import StarpoError
from starpo.generate.sampling import (GenerationStats, Generations, Sample, _cut_at_stop,
                                      render_prompt, row_key, stream_indices)
from starpo.model.chat import stop_token_ids
from starpo.runtime import release_memory

INSTALL = "pip install 'starpo[vllm]'"


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_available(where: str = "generation.backend") -> None:
    """One line naming the extra when vLLM is not installed."""
    if not available():
        raise StarpoError(f"{where}: vllm is not installed; {INSTALL} (a CUDA machine)")


def recipe_needs_vllm(recipe) -> list[str]:
    """Names of the recipe's stages whose generation asks for vLLM."""
    return [st.name for st in recipe.stages
            if getattr(getattr(st, "generation", None), "backend", "hf") == "vllm"]


def prompt_seed(seed: int, stream: int) -> int:
    """The vLLM request seed of the prompt with stream index ``stream`` (31 bits)."""
    return row_key(seed, stream, 0) & 0x7FFFFFFF


def _generation_config(path: str):
    """The checkpoint's generation config (for its eos ids), or None."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


class VLLMBackend:
    """Samples the checkpoint directory ``path`` with vLLM; see the module docstring."""

    name = "vllm"

    def __init__(self, path: str, tokenizer, *, runtime=None, dtype: str = "auto"):
        check_available()
        if tokenizer is None:
            raise StarpoError("generation.backend vllm: the checkpoint's tokenizer is needed "
                              "to render prompts")
        self.path, self.tokenizer, self.runtime, self.dtype = str(path), tokenizer, runtime, dtype

    def _engine(self, spec, seed: int):
        import vllm
        kwargs = dict(model=self.path, tokenizer=self.path, dtype=self.dtype, seed=seed,
                      gpu_memory_utilization=spec.gpu_memory_utilization,
                      enable_sleep_mode=True)
        if self.runtime is not None and self.runtime.distributed:
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=1)
        return vllm.LLM(**kwargs)

    def generate(self, prompts: Sequence, spec, *, n: int = 1, seed: int = 0,
                 progress: bool = True, desc: str = "sampling",
                 indices: Sequence[int] | None = None):
        import time

        import vllm

        if n < 1:
            raise StarpoError(f"generate: n must be at least 1, got {n}")
        tok = self.tokenizer
        encoded = [render_prompt(tok, p) for p in prompts]
        streams = stream_indices(len(encoded), indices)
        stops = stop_token_ids(tok, SimpleNamespace(
            generation_config=_generation_config(self.path)))
        if not stops:
            raise StarpoError("cannot tell where a response ends: the tokenizer has no eos "
                              "token and its chat template no end-of-turn token")
        stop_set = set(stops)
        greedy = spec.temperature == 0
        # greedy decoding has one answer: ask once, repeat it n times (as the HF backend's
        # n greedy rows are identical)
        per_request = 1 if greedy else n
        params = [vllm.SamplingParams(n=per_request, temperature=float(spec.temperature),
                                      top_p=1.0 if greedy else float(spec.top_p),
                                      max_tokens=int(spec.max_new_tokens),
                                      stop_token_ids=list(stops),
                                      seed=prompt_seed(seed, s), skip_special_tokens=True)
                  for s in streams]
        results: list[list[Sample]] = []
        stats = GenerationStats()
        if not encoded:
            return Generations(results, stats)
        llm = self._engine(spec, seed)
        try:
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                sampling_params=params, use_tqdm=progress)
            stats.seconds = time.perf_counter() - t0
        finally:
            # give the GPU back before training (or the log-prob pass) goes on
            if hasattr(llm, "sleep"):
                llm.sleep(level=2)
            del llm
            if self.runtime is None or not self.runtime.distributed:
                try:
                    from vllm.distributed.parallel_state import destroy_model_parallel
                    destroy_model_parallel()
                except ImportError:
                    pass
            release_memory()
        if len(outs) != len(encoded):
            raise StarpoError(f"vllm returned {len(outs)} results for {len(encoded)} prompts")
        for i, out in enumerate(outs):
            group = []
            for comp in out.outputs:
                toks = [int(t) for t in comp.token_ids]
                resp, finished = _cut_at_stop(toks, stop_set)
                if not finished and getattr(comp, "finish_reason", None) == "stop":
                    # a vLLM that leaves the stop token out of token_ids: put it back, so
                    # the sample trains and scores its end of turn like the HF backend's
                    stop = getattr(comp, "stop_reason", None)
                    stop = stop if isinstance(stop, int) and stop in stop_set else None
                    if stop is None and tok.eos_token_id in stop_set:
                        stop = int(tok.eos_token_id)
                    if stop is not None:
                        resp, finished = resp + [stop], True
                text = tok.decode(resp, skip_special_tokens=True).strip()
                group.append(Sample(prompt_index=i, text=text, token_ids=resp,
                                    num_tokens=len(resp), finished=finished))
                stats.tokens += len(resp) * (n if greedy else 1)
                stats.prompt_tokens += len(encoded[i]) * (n if greedy else 1)
            if len(group) != per_request:
                raise StarpoError(f"vllm returned {len(group)} samples for prompt {i}, "
                                  f"asked for {per_request}")
            if greedy:
                group = [Sample(**vars(group[0])) for _ in range(n)]
            results.append(group)
            stats.sequences += n
        return Generations(results, stats)
