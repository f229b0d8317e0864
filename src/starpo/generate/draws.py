"""A row's random stream and the draw of one token from it (see the "Sampling and seeds"
section of :mod:`starpo.generate.sampling`): every (seed, prompt, sample) row has a 64-bit
key, every decoding step of it one uniform number in [0, 1) computed from the key by a
counter-based hash, and a token is drawn by inverting the CDF of the temperature/top-p
distribution at that number. Shared by transformers ``generate``'s logits processor and
the static decoders (:mod:`starpo.generate.static`), so both draw the same tokens from
the same logits."""

from __future__ import annotations

from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """The random stream of one (prompt, sample) row: a 64-bit hash of its identity."""
    k = _splitmix64(seed & _MASK64)
    k = _splitmix64(k ^ (prompt_index & _MASK64))
    return _splitmix64(k ^ ((sample_index * 0xD1B54A32D192ED03) & _MASK64))


def row_uniform(key: int, step: int) -> float:
    """Uniform number in [0, 1) for decoding step ``step`` of the row with ``key``."""
    return (_splitmix64(key ^ ((step * 0x9E3779B97F4A7C15) & _MASK64)) >> 11) * 2.0 ** -53


def row_uniforms(keys: Sequence[int], steps: int) -> torch.Tensor:
    """``[len(keys), steps]`` float64: entry ``[r, s]`` is ``row_uniform(keys[r], s)``.

    The same bits as :func:`row_uniform`, computed for a whole batch at once with numpy's
    wrapping uint64 arithmetic (for the decoders that take a batch's numbers up front)."""
    import numpy as np

    def mix(x):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    k = np.array([int(x) & _MASK64 for x in keys], dtype=np.uint64).reshape(-1, 1)
    s = np.arange(steps, dtype=np.uint64).reshape(1, -1) * np.uint64(0x9E3779B97F4A7C15)
    bits = mix(k ^ s) >> np.uint64(11)
    return torch.from_numpy(bits.astype(np.float64) * 2.0 ** -53)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
                  top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row by inverting the CDF with the given uniform numbers.

    logits: [B, V]; uniforms: [B] in [0, 1). Probabilities are ``softmax(logits / T)`` in
    float64; with ``top_p < 1`` only the smallest set of most likely tokens whose mass
    reaches ``top_p`` is kept (the most likely token always is), then renormalised.
    Returns [B] token ids. Deterministic: the same logits and uniforms give the same ids.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs * (mass_before < top_p)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # round-off could push idx past the last token with probability > 0: clamp to it
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, positions, -1).max(-1).values
    idx = torch.minimum(idx, last_positive)
    if order is not None:
        idx = order.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return idx
