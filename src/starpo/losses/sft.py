"""The SFT loss."""

from __future__ import annotations

from torch import Tensor


def nll_sum(target_logps: Tensor) -> Tensor:
    """Negative log-likelihood summed over trained tokens.

        L = −Σ_i log p(target_i)

    ``target_logps`` is ``[N]``, one entry per trained token (the third output of
    :func:`starpo.model.logprobs.sequence_logprobs`). It is a sum, not a mean: the training
    loop divides by the trained tokens of the whole optimizer step (every micro-batch and
    process), so gradient accumulation and the process count leave the loss scale alone.
    Returns a scalar.
    """
    return -target_logps.sum()
