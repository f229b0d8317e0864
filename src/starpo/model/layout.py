"""The one row-layout decision of every packed micro-batch: SFT rows, preference pairs,
the reference pass, reward pairs."""

from __future__ import annotations

from torch import nn

from starpo.model.attention import describe, one_row_batches
from starpo.model.logprobs import unwrap_model


def row_cap(model: nn.Module, cap: int | None, *, prefix_shared: bool) -> int | None:
    """``None`` — each micro-batch is one unpadded row of any length — when
    :func:`~starpo.model.attention.one_row_batches` allows it for ``model`` (wrappers are
    looked through); else rows of at most ``cap`` tokens, because whole-row attention costs
    ``L²`` (measured on CPU sdpa: one 5265-token row 5.7 s, the same tokens in 256-token
    rows 0.4 s)."""
    if one_row_batches(unwrap_model(model), prefix_shared=prefix_shared):
        return None
    return cap


def attention_note(model: nn.Module, *, prefix_shared: bool) -> str:
    """The log line naming the kernel that keeps ``model``'s packed rows apart
    (:func:`~starpo.model.attention.describe`)."""
    return describe(unwrap_model(model), prefix_shared=prefix_shared)
