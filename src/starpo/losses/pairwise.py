"""The loss of a pairwise preference model (a judge that reads both responses at once)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pairwise_bce(first_chosen: Tensor, first_rejected: Tensor) -> Tensor:
    """Per-pair binary cross-entropy over both presentation orders, ``[P]`` → ``[P]``.

    ``first_chosen`` is the model's logit that response A wins when A is the chosen
    response and B the rejected one (target 1); ``first_rejected`` the logit with the
    order swapped (A rejected, B chosen; target 0). With ``z_cr``, ``z_rc`` for the two::

        L = ½ [BCE(σ(z_cr), 1) + BCE(σ(z_rc), 0)]
          = ½ [−log σ(z_cr) − log(1 − σ(z_rc))]
          = ½ [softplus(−z_cr) + softplus(z_rc)]

    Training on both orders of every pair is what teaches the model that the verdict
    belongs to the responses, not to their positions. The mean over the two orders keeps
    one pair's loss on the scale of one Bradley–Terry term (log 2 for a model that says
    ½ to everything).
    """
    return 0.5 * (F.softplus(-first_chosen) + F.softplus(first_rejected))
