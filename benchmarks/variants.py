"""Benchmark-side variants of starpo's fast paths (ablations and prototypes).

Nothing here changes starpo: each variant is a thin subclass or wrapper around the
library's own pieces, used to switch one fast path off, or to try a change before
proposing it for the library.

* ``logprob_fn``         ``chunked`` (starpo's ``sequence_logprobs``) or ``plain`` (chunked
                         log-probs off: full ``[B, L, V]`` logits and their log-softmax, with
                         the same attention as the library path, so only the head differs).
* ``BenchPreferenceTask`` a ``PreferenceTask`` with a chosen collate function (layout and
                         row cap), a chosen log-prob function, and optionally a reference
                         model evaluated inside every step (reference cache off).
* ``reference_pass``     the reference log-probs of all pairs with a chosen collate/log-prob
                         function (``starpo.train.refcache.compute_reference`` fixes both).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from starpo.data import prefbatch as PB
from starpo.data.batch import TokenBatch
from starpo.model.attention import attention_for, segment_attention
from starpo.model.logprobs import model_attention_mask, sequence_logprobs, unwrap_model
from starpo.train.preference import PreferenceTask
from starpo.stages.sft import SFTTask


def full_logits_logprobs(model: nn.Module, batch: TokenBatch):
    """``sequence_logprobs`` with the chunked head switched off: the model's own forward
    (full logits, float32 log-softmax, gather), attention as in the library path."""
    core = unwrap_model(model)
    kind = attention_for(core, batch.attention_mask,
                         prefix_shared=bool(batch.meta.get("implicit_prefix")))
    with segment_attention(core, kind, position_ids=batch.position_ids,
                           rows=batch.input_ids.shape[0],
                           host_position_ids=batch.meta.get("host_position_ids")) \
            if kind else contextlib.nullcontext():
        out = core(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   attention_mask=batch.attention_mask if kind else
                   model_attention_mask(core, batch))
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    per = logp[batch.tgt_row, batch.tgt_pos, batch.tgt_ids]
    sums = torch.zeros(batch.num_seqs, dtype=per.dtype).index_add(0, batch.tgt_seq, per)
    return sums, torch.bincount(batch.tgt_seq, minlength=batch.num_seqs), per


def logprob_fn(kind: str):
    """``(model, batch) -> (sums, counts, per_target)`` for: chunked | plain."""
    if kind == "chunked":
        return lambda m, b: sequence_logprobs(unwrap_model(m), b)
    if kind == "plain":
        return full_logits_logprobs
    raise ValueError(kind)


class FnModule:
    """Stands in for the loop's ``TargetLogprobs`` module with another log-prob function."""

    def __init__(self, module: nn.Module, fn):
        self.module, self.fn = module, fn

    def __call__(self, batch: TokenBatch):
        return self.fn(self.module, batch)


def collate_fn(layout: str, row_cap: int | None, pad_id: int):
    """``pairs (dicts) -> TokenBatch`` for a layout: prefix | free | padded."""
    if layout == "prefix":
        return functools.partial(PB.collate_prefix_shared, max_tokens_per_row=row_cap,
                                 pad_id=pad_id)
    if layout == "free":
        return functools.partial(PB.collate_padding_free, max_tokens_per_row=row_cap,
                                 pad_id=pad_id)
    if layout == "padded":
        return functools.partial(PB.collate_padded, pad_id=pad_id)
    raise ValueError(layout)


class BenchPreferenceTask(PreferenceTask):
    def __init__(self, pairs, spec, *, batch_size, pad_id, seed, collate, logprobs="chunked",
                 ref_model: nn.Module | None = None, ref_chosen=None, ref_rejected=None):
        super().__init__(pairs, spec, batch_size=batch_size, pad_id=pad_id, seed=seed,
                         ref_chosen=ref_chosen, ref_rejected=ref_rejected)
        self.collate, self.fn, self.ref_model = collate, logprob_fn(logprobs), ref_model

    def batch_for(self, idx):
        b = self.collate([self.pairs[i].as_dict() for i in idx])
        b.meta["pairs"] = torch.tensor(idx, dtype=torch.long)
        if self.ref_c is not None:
            b.meta["ref_chosen"] = self.ref_c[idx]
            b.meta["ref_rejected"] = self.ref_r[idx]
        return b

    def loss(self, module, batch):
        if self.ref_model is not None:             # reference cache off: a 2nd model, every step
            with torch.no_grad():
                lp, _, _ = self.fn(self.ref_model, batch)
            batch.meta["ref_chosen"], batch.meta["ref_rejected"] = lp[0::2], lp[1::2]
        return super().loss(FnModule(module, self.fn), batch)


class BenchSFTTask(SFTTask):
    """``SFTTask`` with another log-prob function."""

    def __init__(self, layout, *, batch_size, pad_id, seed, logprobs="chunked", flat=False):
        super().__init__(layout, batch_size=batch_size, pad_id=pad_id, seed=seed, flat=flat)
        self.fn = logprob_fn(logprobs)

    def loss(self, module, batch):
        return super().loss(FnModule(module, self.fn), batch)


@torch.no_grad()
def reference_pass(model, pairs, *, collate, batch_size: int, logprobs: str = "chunked"):
    model.eval()
    fn = logprob_fn(logprobs)
    ch, rj = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for s in range(0, len(pairs), batch_size):
        b = collate([p.as_dict() for p in pairs[s:s + batch_size]])
        lp = fn(model, b)[0].float()
        ch[s:s + len(lp) // 2] = lp[0::2]
        rj[s:s + len(lp) // 2] = lp[1::2]
    model.train()
    return ch, rj
