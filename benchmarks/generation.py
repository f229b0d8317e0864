"""Sampling throughput of the HF backend: one timed ``generate`` call of N prompts × up to T
new tokens, for a given model, tokenizer and decoder settings.

For ``scripts/gpu_bench.py`` (generation rows of the GPU table) and for measuring the CPU
decoders; the ``gpu`` tests of ``tests/generate/test_static.py`` print it as well::

    from benchmarks.generation import time_generation
    r = time_generation(model, tok, prompts=121, new_tokens=128, decoder="graph")
    r["tokens_per_s"], r["decoder"], r["rows_per_batch"]

Tokens are the generated ones (stop tokens included, as ``GenerationStats`` counts them):
a row that ends before ``new_tokens`` contributes fewer, so ``tokens`` ≤ N·n·T is reported
beside ``max_tokens``. ``seconds`` is the decoding time the backend measures (prompt
rendering and text decoding excluded; a graph decoder's capture included: it happens in
every call); ``wall_s`` is the whole call.
"""

from __future__ import annotations

import time
from typing import Sequence


def world_prompts(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` prompts (message lists) of the embedded world's eval split."""
    from starpo.world import World
    return [r["prompt"] for r in World(seed).eval_rows(n)]


def time_generation(model, tokenizer, *, prompts: int | Sequence = 121, new_tokens: int = 128,
                    n: int = 1, decoder: str = "auto", decode_batch_size: int | str = "auto",
                    batch_size: int = 32, temperature: float = 0.8, top_p: float = 1.0,
                    seed: int = 0, warmup: bool = True) -> dict:
    """Time one HF-backend sampling call; returns its figures as a dict.

    prompts: a count of :func:`world_prompts`, or the prompts themselves (message lists
    or strings). ``decoder``, ``decode_batch_size`` and ``batch_size`` are the recipe's
    ``generation`` knobs. ``warmup`` first runs the same call with 4 new tokens (kernel
    loading, allocator growth and cuBLAS set-up are then not timed).

    Keys: ``decoder`` (which ran), ``why``, ``rows_per_batch``, ``graph`` (whether a CUDA
    graph was replayed), ``sequences``, ``prompt_tokens``, ``tokens``, ``max_tokens``,
    ``seconds``, ``tokens_per_s``, ``wall_s``, ``warmup_s``, ``device``.
    """
    import torch

    from starpo.generate.sampling import HFBackend
    from starpo.recipe import GenerationSpec

    if isinstance(prompts, int):
        prompts = world_prompts(prompts)
    prompts = list(prompts)
    spec = GenerationSpec(temperature=temperature, top_p=top_p, max_new_tokens=new_tokens,
                          batch_size=batch_size, decoder=decoder,
                          decode_batch_size=decode_batch_size)
    backend = HFBackend(model, tokenizer)
    device = next(model.parameters()).device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warm = 0.0
    if warmup:
        t0 = time.perf_counter()
        backend.generate(prompts, spec.model_copy(update={"max_new_tokens": min(4, new_tokens)}),
                         n=n, seed=seed, progress=False, desc="warm-up")
        sync()
        warm = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    gens = backend.generate(prompts, spec, n=n, seed=seed, progress=False,
                            desc="timed sampling")
    sync()
    wall = time.perf_counter() - t0
    st, dec = gens.stats, backend.last_decoder
    return {"decoder": dec.get("decoder"), "why": dec.get("why"),
            "rows_per_batch": dec.get("rows_per_batch"), "graph": dec.get("graph", "not used"),
            "sequences": st.sequences, "prompt_tokens": st.prompt_tokens, "tokens": st.tokens,
            "max_tokens": len(prompts) * n * new_tokens, "seconds": st.seconds,
            "tokens_per_s": st.tokens_per_s, "wall_s": wall, "warmup_s": warm,
            "device": str(device)}
