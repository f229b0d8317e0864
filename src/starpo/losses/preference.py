"""Preference and SFT losses as small pure functions.

Every preference loss takes per-example *summed* response log-probs and returns three
tensors of shape ``[P]`` (P = number of pairs in the batch):

    losses            the per-pair loss (reduce it yourself: ``losses.mean()``)
    chosen_rewards    the implicit reward of the chosen response, for logging (detached)
    rejected_rewards  the same for the rejected response (detached)

Notation (REFERENCE.md), all tensors ``[P]``:

    pc, pr   policy log-probs of chosen / rejected:  lp_π(y) = Σ_t log π(y_t | x, y_<t)
             summed over the trained response tokens only
    rc, rr   the same under the reference model
    nc, nr   number of trained response tokens (|y_w|, |y_l|), ≥ 1; int or float tensors
    r(y)     = lp_π(y) − lp_ref(y)   the implicit reward (log-ratio)

Label smoothing ε (conservative DPO, Mitchell 2023) replaces ``L(h) = −log σ(h)`` by
``(1 − ε)·L(h) + ε·L(−h)``: the label is assumed flipped with probability ε.

Log-probs should be float32 (``starpo.logprobs`` returns float32 whatever the model dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("dpo", "ln_dpo", "simpo", "ipo", "ipo_per_token")


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

    Without counts (the paper's and REFERENCE.md's form, on summed log-probs):

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


def preference_loss(name: str, pc: Tensor, pr: Tensor, rc: Tensor | None = None,
                    rr: Tensor | None = None, nc=None, nr=None, *, beta: float,
                    gamma: float = 0.0, label_smoothing: float = 0.0
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch on a config's loss name: ``dpo``, ``ln_dpo``, ``simpo``, ``ipo`` (summed
    log-probs, the paper's form) or ``ipo_per_token`` (TRL's per-token-averaged IPO).

    Arguments a loss does not use are ignored (``gamma`` outside SimPO, the reference
    log-probs for SimPO, counts for DPO), so a stage can always pass everything it has.
    ``label_smoothing > 0`` with an IPO loss is an error: IPO has no smoothed form.
    """
    if name in ("dpo", "ln_dpo", "ipo", "ipo_per_token") and (rc is None or rr is None):
        raise ValueError(f"loss {name!r} needs reference log-probs (rc, rr)")
    if name in ("ln_dpo", "simpo", "ipo_per_token") and (nc is None or nr is None):
        raise ValueError(f"loss {name!r} needs response token counts (nc, nr)")
    if name.startswith("ipo") and label_smoothing:
        raise ValueError(f"loss {name!r} does not support label_smoothing "
                         f"(got {label_smoothing}); set it to 0")
    if name == "dpo":
        return dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    if name == "ln_dpo":
        return ln_dpo(pc, pr, rc, rr, nc, nr, beta=beta, label_smoothing=label_smoothing)
    if name == "simpo":
        return simpo(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    if name == "ipo":
        return ipo(pc, pr, rc, rr, beta=beta)
    if name == "ipo_per_token":
        return ipo(pc, pr, rc, rr, nc, nr, beta=beta)
    raise ValueError(f"unknown preference loss {name!r}; expected one of {', '.join(LOSSES)}")


def needs_reference(name: str) -> bool:
    """Whether a preference loss reads reference log-probs (SimPO does not)."""
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; expected one of {', '.join(LOSSES)}")
    return name != "simpo"


def sft_loss(target_logps: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """Token-level mean negative log-likelihood.

        L = −Σ_i log p(target_i) / num_items

    ``target_logps`` is ``[N]`` (one entry per trained token, e.g. the third output of
    ``starpo.logprobs.sequence_logprobs``). ``num_items`` defaults to N; pass the number of
    trained tokens of the whole optimizer step (all micro-batches, all ranks) so gradient
    accumulation does not change the loss scale. Returns a scalar.
    """
    denom = target_logps.numel() if num_items is None else num_items
    if isinstance(denom, Tensor):
        denom = denom.to(target_logps.dtype).clamp(min=1)
    else:
        denom = max(int(denom), 1)
    return -target_logps.sum() / denom
