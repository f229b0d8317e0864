"""What a stage gives the training loop: a :class:`Task`, and the module the loop wraps."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from starpo.data.batch import TokenBatch
from starpo.model.logprobs import sequence_logprobs

# name -> (sum, count), averaged as sum/count; a sum may be a device tensor (metric_sum)
Metrics = dict[str, tuple]


def metric_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ t`` as a float64 scalar left on ``t``'s device: the loop adds these up and reads
    them once per logged step (reading each one would make the host wait for the GPU once
    per metric and micro-batch). Same value as ``float(t.float().sum())``."""
    return t.detach().float().sum().double()


class Task(Protocol):
    def microbatches(self, epoch: int) -> list[TokenBatch]: ...
    def units(self, batch: TokenBatch) -> float: ...
    def loss(self, module: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, Metrics]: ...


class TargetLogprobs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns per-sequence log-probs of the targets.

    The wrapper is what accelerate prepares (DDP/FSDP hooks fire on its forward), and its
    forward never materialises full-vocabulary logits (see :mod:`starpo.model.logprobs`).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def _no_split_modules(self):
        # FSDP's transformer-based auto wrap reads this from the module it prepares (this
        # wrapper): the wrapped model's decoder layer classes become the wrap units
        from starpo.model.logprobs import unwrap_model
        return getattr(unwrap_model(self.model), "_no_split_modules", None)

    def forward(self, batch: TokenBatch):
        return sequence_logprobs(self.model, batch, chunk_size=self.chunk_size)
