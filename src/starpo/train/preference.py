"""The preference task of the training loop: pairs → micro-batches → a registered loss.

Shared by the offline (dpo) stage and every online round. Each micro-batch is padding-free
(chosen and rejected packed as separate documents) or prefix-shared (prompt computed
once, both responses attend to it), see :mod:`starpo.data.prefbatch`; the loss is the
recipe's entry of :mod:`starpo.losses`.
"""

from __future__ import annotations

import random

import torch

from starpo import losses
from starpo.data import prefbatch as PB
from starpo.data.batch import TokenBatch
from starpo.data.tokenize import TokenizedPair
from starpo.model.layout import row_cap
from starpo.recipe import PreferenceSpec
from starpo.runtime import Runtime
from starpo.model.logprobs import TargetLogprobs
from starpo.train.loop import trained_microbatches
from starpo.train.task import metric_sum


def row_tokens(spec: PreferenceSpec) -> int:
    """Row cap for packed preference batches. Truncation keeps prompt + either response
    within max_length, so a prefix-shared segment (prompt, chosen, rejected) fits in twice
    that. Without a cap a micro-batch becomes one long row, and sdpa on CPU pays attention
    over the whole row (measured: one 5265-token row 5.7 s, the same in 256-token rows 0.4 s)."""
    return 2 * spec.max_length


def collate_pairs(pairs: list[TokenizedPair], spec: PreferenceSpec, pad_id: int, *,
                  one_row: bool = False) -> TokenBatch:
    """A micro-batch of pairs in the spec's layout. ``one_row``
    (:func:`starpo.model.attention.one_row_batches`): no row cap, so no padding, and for prefix
    sharing no dense mask."""
    return PB.collate_pairs([p.as_dict() for p in pairs], prefix_sharing=spec.prefix_sharing,
                            padding_free=spec.padding_free,
                            cap=None if one_row else row_tokens(spec), pad_id=pad_id)


def one_row(model, stage) -> bool:
    """Micro-batches of ``stage`` as single rows for ``model`` (see ``collate_pairs``)."""
    if not (stage.prefix_sharing or stage.padding_free):
        return False
    return row_cap(model, row_tokens(stage), prefix_shared=stage.prefix_sharing) is None


# a margin within float noise is a tie and counts one half: at step 0 the policy equals
# the reference and every margin is ~1e-7, not a coin flip of signs
TIE = 1e-4


def _per_seq_mean_prob(tok_lp: torch.Tensor, batch: TokenBatch, counts: torch.Tensor):
    probs = torch.zeros(batch.num_seqs, dtype=tok_lp.dtype, device=tok_lp.device)
    probs.index_add_(0, batch.tgt_seq, tok_lp.detach().exp())
    return probs / counts.clamp(min=1)


def pair_metrics(spec, pc, pr, nc, nr, rc, rr, losses, cr, rjr, mean_p) -> dict:
    """Sums (with counts) of the logged metrics for a micro-batch of pairs."""
    n = float(pc.numel())
    s = metric_sum
    mean_pc, mean_pr = PB.split_pairs(mean_p)
    return {
        "loss": (s(losses), n),
        "reward_chosen": (s(cr), n),
        "reward_rejected": (s(rjr), n),
        "reward_margin": (s(cr - rjr), n),
        "reward_accuracy": (s((cr - rjr > TIE).float() + 0.5 * ((cr - rjr).abs() <= TIE).float()),
                            n),
        "logp_chosen": (s(pc), n),
        "logp_rejected": (s(pr), n),
        "token_prob_margin": (s(mean_pc - mean_pr), n),
        "len_chosen": (s(nc), n),
        "len_rejected": (s(nr), n),
    }


class PreferenceTask:
    """Pairs → micro-batches; loss = Σ over pairs (the loop divides by the step's pairs)."""

    def __init__(self, pairs: list[TokenizedPair], spec: PreferenceSpec, *, batch_size: int,
                 pad_id: int, seed: int, ref_chosen=None, ref_rejected=None,
                 one_row: bool = False):
        self.pairs, self.spec, self.batch_size = pairs, spec, batch_size
        self.loss_def = losses.get(spec.loss)
        self.pad_id, self.seed, self.one_row = pad_id, seed, one_row
        self.ref_c, self.ref_r = ref_chosen, ref_rejected

    def batch_for(self, idx: list[int]) -> TokenBatch:
        b = collate_pairs([self.pairs[i] for i in idx], self.spec, self.pad_id,
                          one_row=self.one_row)
        b.meta["pairs"] = torch.tensor(idx, dtype=torch.long)
        if self.ref_c is not None:
            b.meta["ref_chosen"] = self.ref_c[idx]
            b.meta["ref_rejected"] = self.ref_r[idx]
        return b

    def groups(self, epoch: int) -> list[list[int]]:
        """The pair indices of each micro-batch of ``epoch`` (a seeded shuffle, cut into
        ``batch_size`` groups)."""
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]

    def microbatches(self, epoch: int) -> list[TokenBatch]:
        return [self.batch_for(g) for g in self.groups(epoch)]

    def trained_pairs(self, spec, world: int = 1) -> list[int]:
        """Indices of the pairs the loop will train on under ``spec`` (a TrainSpec; with
        ``max_steps`` or ``epochs`` < 1 possibly fewer than all), sorted."""
        n_mb = len(self.groups(0))
        used: set[int] = set()
        for epoch, mbs in trained_microbatches(n_mb, spec, world).items():
            groups = self.groups(epoch)
            for k in mbs:
                used.update(groups[k])
        return sorted(used)

    def units(self, batch: TokenBatch) -> float:
        return float(batch.num_seqs // 2)

    def forward(self, module, batch: TokenBatch):
        lp, counts, tok_lp = module(batch)
        pc, pr = PB.split_pairs(lp)
        nc, nr = PB.split_pairs(counts.to(lp.dtype))
        rc = rr = None
        if self.loss_def.needs_reference:
            rc = batch.meta["ref_chosen"].to(lp.device, lp.dtype)
            rr = batch.meta["ref_rejected"].to(lp.device, lp.dtype)
        losses, cr, rjr = self.loss_def(pc, pr, rc, rr, nc, nr, beta=self.spec.beta,
                                        gamma=self.spec.gamma,
                                        label_smoothing=self.spec.label_smoothing)
        mean_p = _per_seq_mean_prob(tok_lp, batch, counts)
        return losses, pair_metrics(self.spec, pc, pr, nc, nr, rc, rr, losses, cr, rjr, mean_p)

    def loss(self, module, batch: TokenBatch):
        losses, metrics = self.forward(module, batch)
        return losses.sum(), metrics


@torch.no_grad()
def evaluate_pairs(model, task: PreferenceTask, runtime: Runtime, *,
                   chunk_size: int = 1024) -> dict:
    """Mean metrics of ``task``'s pairs under ``model`` (held-out reward accuracy etc.),
    computed on the runtime's device (where the model is)."""
    module = TargetLogprobs(model, chunk_size)
    was = model.training
    model.eval()
    tot: dict[str, list[float]] = {}
    for b in task.microbatches(0):
        b = runtime.batch(b)
        _, m = task.forward(module, b)
        for k, (s, c) in m.items():
            t = tot.setdefault(k, [0.0, 0.0])
            t[0] += s
            t[1] += c
    model.train(was)
    return {k: float(s / c) for k, (s, c) in tot.items() if c}
