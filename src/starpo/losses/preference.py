"""Preference losses as small pure functions.

Every preference loss takes per-example *summed* response log-probs and returns three
tensors of shape ``[P]`` (P = number of pairs in the batch):

    losses            the per-pair loss (reduce it yourself: ``losses.mean()``)
    chosen_rewards    the implicit reward of the chosen response, for logging (detached)
    rejected_rewards  the same for the rejected response (detached)

Notation (docs/losses.md), all tensors ``[P]``:

    pc, pr   policy log-probs of chosen / rejected:  lp_π(y) = Σ_t log π(y_t | x, y_<t)
             summed over the trained response tokens only
    rc, rr   the same under the reference model
    nc, nr   number of trained response tokens (|y_w|, |y_l|), ≥ 1; int or float tensors
    r(y)     = lp_π(y) − lp_ref(y)   the implicit reward (log-ratio)

Label smoothing ε (conservative DPO, Mitchell 2023) replaces ``L(h) = −log σ(h)`` by
``(1 − ε)·L(h) + ε·L(−h)``: the label is assumed flipped with probability ε.

Log-probs should be float32 (``starpo.model.logprobs`` returns float32 whatever the model dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

def _smoothed_logistic(h: Tensor, label_smoothing: float) -> Tensor:
    """(1 − ε)·(−log σ(h)) + ε·(−log σ(−h)), elementwise."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(h)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h)
    return loss


def _count(n, like: Tensor) -> Tensor:
    """Token counts as a float tensor on ``like``'s device (counts are ints upstream)."""
    return torch.as_tensor(n, device=like.device).to(like.dtype)


def dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float,
        label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7).

        h = β · ( (pc − rc) − (pr − rr) )
        L = −log σ(h)                      (with ε: (1 − ε)·L(h) + ε·L(−h))
        rewards: β·(pc − rc), β·(pr − rr)

    Shapes: all inputs ``[P]``; returns three ``[P]`` tensors.
    TRL equivalent: ``DPOTrainer`` with ``loss_type="sigmoid"`` (which in TRL 1.16 ignores
    ``label_smoothing``; ε > 0 here is the original conservative-DPO formula).
    """
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    losses = _smoothed_logistic(beta * (chosen_logratio - rejected_logratio), label_smoothing)
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def ln_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, nc, nr, *, beta: float,
           label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO (the *PO guide, arXiv 2407.15229).

        h = β · ( (pc − rc)/nc − (pr − rr)/nr )
        L = −log σ(h)                      (with ε: (1 − ε)·L(h) + ε·L(−h))
        rewards: β·(pc − rc)/nc, β·(pr − rr)/nr

    Shapes: ``pc, pr, rc, rr, nc, nr`` all ``[P]`` (counts may be int tensors); returns
    three ``[P]`` tensors. TRL equivalent: ``loss_type="sigmoid_norm"``.
    """
    chosen = (pc - rc) / _count(nc, pc)
    rejected = (pr - rr) / _count(nr, pr)
    losses = _smoothed_logistic(beta * (chosen - rejected), label_smoothing)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def simpo(pc: Tensor, pr: Tensor, nc, nr, *, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6): no reference model.

        h = β·pc/nc − β·pr/nr − γ
        L = −log σ(h)                      (with ε: (1 − ε)·L(h) + ε·L(−h))
        rewards: β·pc/nc, β·pr/nr

    ``gamma`` is the target reward margin γ itself. SimPO's official code configures
    ``gamma_beta_ratio`` instead: pass ``gamma = beta * gamma_beta_ratio``.
    Shapes: inputs ``[P]``; returns three ``[P]`` tensors.
    TRL equivalent: experimental ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``
    (its ``simpo_gamma`` is this γ).
    """
    chosen = beta * pc / _count(nc, pc)
    rejected = beta * pr / _count(nr, pr)
    losses = _smoothed_logistic(chosen - rejected - gamma, label_smoothing)
    return losses, chosen.detach(), rejected.detach()


def ipo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, nc=None, nr=None, *,
        beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Identity Preference Optimization (Azar et al. 2023, eq. 17), β playing τ.

    Without counts (the paper's form (docs/losses.md), on summed log-probs):

        h = (pc − rc) − (pr − rr)
        L = ( h − 1/(2β) )²

    With counts ``nc, nr`` (TRL's ``loss_type="ipo"``, which averages per token because the
    summed form makes the squared loss grow with response length):

        h = (pc − rc)/nc − (pr − rr)/nr
        L = ( h − 1/(2β) )²

    Rewards are ``β·(pc − rc)``, ``β·(pr − rr)`` in both forms (as TRL logs them).
    IPO has no label smoothing. Shapes: inputs ``[P]``; returns three ``[P]`` tensors.
    """
    if (nc is None) != (nr is None):
        raise ValueError("ipo: pass both nc and nr (per-token form) or neither (summed form)")
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    if nc is None:
        h = chosen_logratio - rejected_logratio
    else:
        h = chosen_logratio / _count(nc, pc) - rejected_logratio / _count(nr, pr)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()
