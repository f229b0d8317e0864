"""The reward-model loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair Bradley–Terry loss on scalar scores, shapes ``[P]`` → ``[P]``.

        L = −log σ(r_c − r_r) = softplus(r_r − r_c)   (the softplus form is stable for any margin)
    """
    return F.softplus(rejected - chosen)
