"""The pairwise_rm stage: a pairwise preference model (in the spirit of PairRM) trained on
the same preference pairs as the reward stage, on the same machinery.

Where a reward model scores each response on its own and learns from the difference of
two scores, a pairwise model reads the prompt and *both* responses in one sequence (the
layout of :mod:`starpo.judges.pairwise_rm`: the chat template over the prompt and one
assistant turn ``"A: {a}\\nB: {b}"``) and its scalar head gives the logit of P(A is
better than B). It can weigh one response against the other token by token, which a
reward model cannot; it also has a position to be biased toward, which training on both
orders removes.

Data
    Every canonical pair (chosen c, rejected r) becomes two documents: ``A=c, B=r``
    (target 1) and ``A=r, B=c`` (target 0), tokenized exactly as the reward stage
    tokenizes its pairs (the two layouts stand where chosen and rejected stand, so
    :func:`starpo.stages.reward.collate_reward_pairs` packs them padding-free and
    :func:`starpo.stages.reward.sequence_scores` reads each one's last token). The
    held-out split (``data.eval_fraction``) is taken before the rewrite, so with the same
    data and seed it is the reward stage's split. ``max_length`` bounds prompt + both
    responses.

Loss
    :func:`starpo.losses.pairwise.pairwise_bce`, per pair the mean BCE of the two orders,
    ``½ [softplus(−z_cr) + softplus(z_rc)]``, summed over the micro-batch's pairs (the loop
    divides by the step's pairs). Logged (:func:`pairwise_metrics`): ``loss``,
    ``reward_accuracy`` (the judge's both-orders verdict is right: z_cr > z_rc, a tie
    counts one half; the same name as the reward stage's, so the two compare),
    ``reward_margin`` (½ (z_cr − z_rc), the both-orders logit for the chosen response),
    ``order_agreement`` (share of pairs whose two orders give the same winner) and
    ``prefers_first`` (share of presentations in which A wins; ½ = no position bias).

Checkpoint
    ``DIR/<stage>/model/``: a plain ``AutoModelForSequenceClassification`` checkpoint
    (body + one-logit head) with the layout's name in ``config.json``; the
    ``pairwise_rm`` judge (``judge: {type: pairwise_rm, path: <stage>}``) loads it.
"""

from __future__ import annotations

from torch import Tensor

from starpo.canonical import response_text
from starpo.judges.pairwise_rm import LAYOUT, LAYOUT_KEY, pair_response
from starpo.losses.pairwise import pairwise_bce
from starpo.stages.reward import PairObjective, train_pair_scorer
from starpo.train.task import metric_sum


def pairwise_rows(rows: list[dict]) -> list[dict]:
    """Canonical preference rows → rows whose "chosen" is the layout with the chosen
    response first and "rejected" the layout with it second (the same prompt)."""
    out = []
    for r in rows:
        c, j = response_text(r["chosen"]), response_text(r["rejected"])
        out.append({**r, "chosen": [{"role": "assistant", "content": pair_response(c, j)}],
                    "rejected": [{"role": "assistant", "content": pair_response(j, c)}]})
    return out


def pairwise_metrics(first_chosen: Tensor, first_rejected: Tensor, losses: Tensor) -> dict:
    """Sums (with counts) of the logged metrics for a micro-batch of pairs, from the
    logits of the two presentations (chosen first, rejected first)."""
    n = float(first_chosen.numel())
    s = metric_sum
    zc, zr = first_chosen.detach(), first_rejected.detach()
    d = zc - zr
    return {"loss": (s(losses), n),
            "reward_accuracy": (s((d > 0).float() + 0.5 * (d == 0).float()), n),
            "reward_margin": (s(0.5 * d), n),
            "order_agreement": (s(((zc > 0) != (zr > 0)).float()), n),
            "prefers_first": (s((zc > 0).float() + (zr > 0).float()), 2 * n)}


PAIRWISE = PairObjective("pairwise BCE over both orders", "pairwise accuracy", pairwise_bce,
                         pairwise_metrics, transform=pairwise_rows, transform_key=LAYOUT,
                         config={LAYOUT_KEY: LAYOUT})


def run_pairwise_rm(ctx, stage) -> dict:
    return train_pair_scorer(ctx, stage, PAIRWISE, what="pairwise model")
