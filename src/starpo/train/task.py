"""What a stage gives the training loop: a :class:`Task` (the module the loop wraps is
:class:`starpo.model.logprobs.TargetLogprobs`)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from starpo.data.batch import TokenBatch

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
