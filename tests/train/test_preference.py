"""The production preference path: PreferenceTask (batches → registered loss), its logged
metrics and the held-out evaluation, checked against the pure losses by hand."""

from __future__ import annotations


import pytest
import torch

from conftest import random_pairs, tiny_llama
from starpo import losses
from starpo.data import prefbatch as PB
from starpo.model.logprobs import sequence_logprobs
from starpo.recipe import PreferenceSpec
from starpo.runtime import Runtime
from starpo.train.preference import TIE, PreferenceTask, evaluate_pairs
from starpo.model.logprobs import TargetLogprobs

VOCAB = 60


def _pairs(n=6, seed=0):
    return random_pairs(n, VOCAB, seed)


@torch.no_grad()
def _by_hand(model, pairs):
    """Summed log-probs and counts of every pair, one plain padded batch."""
    b = PB.collate_padded([p.as_dict() for p in pairs], pad_id=0)
    lp, counts, _ = sequence_logprobs(model, b)
    return lp[0::2], lp[1::2], counts[0::2].float(), counts[1::2].float()


@pytest.mark.parametrize("loss,layout", [("dpo", "prefix"), ("ln_dpo", "free"),
                                         ("simpo", "prefix"), ("ipo", "padded")])
def test_task_loss_is_the_registered_loss_on_the_policys_logprobs(loss, layout, one_thread):
    model = tiny_llama(VOCAB)
    pairs = _pairs()
    spec = PreferenceSpec(loss=loss, beta=0.4, gamma=0.3, prefix_sharing=layout == "prefix",
                          padding_free=layout != "padded")
    g = torch.Generator().manual_seed(1)
    ref_c, ref_r = torch.randn(len(pairs), generator=g), torch.randn(len(pairs), generator=g)
    task = PreferenceTask(pairs, spec, batch_size=len(pairs), pad_id=0, seed=0,
                          ref_chosen=ref_c, ref_rejected=ref_r)
    batch = task.batch_for(list(range(len(pairs))))
    loss_sum, metrics = task.loss(TargetLogprobs(model), batch)
    pc, pr, nc, nr = _by_hand(model, pairs)
    want, cr, rr = losses.preference_loss(loss, pc, pr, ref_c, ref_r, nc, nr, beta=0.4,
                                          gamma=0.3)
    torch.testing.assert_close(loss_sum, want.sum(), rtol=1e-5, atol=1e-5)
    assert metrics["loss"][1] == len(pairs)
    assert metrics["reward_margin"][0] == pytest.approx(float((cr - rr).sum()), abs=1e-4)
    assert task.units(batch) == len(pairs)


def test_simpo_never_reads_reference_logprobs(one_thread):
    model = tiny_llama(VOCAB)
    pairs = _pairs()
    task = PreferenceTask(pairs, PreferenceSpec(loss="simpo", beta=2.0), batch_size=3,
                          pad_id=0, seed=0)                   # no reference at all
    loss_sum, _ = task.loss(TargetLogprobs(model), task.microbatches(0)[0])
    assert torch.isfinite(loss_sum)
    dpo = PreferenceTask(pairs, PreferenceSpec(loss="dpo"), batch_size=3, pad_id=0, seed=0)
    with pytest.raises(KeyError):
        dpo.loss(TargetLogprobs(model), dpo.microbatches(0)[0])


def test_held_out_accuracy_is_one_half_when_policy_equals_reference(one_thread):
    """At step 0 every margin is float noise: a tie (½), not a coin flip of signs."""
    model = tiny_llama(VOCAB)
    pairs = _pairs(8)
    pc, pr, _, _ = _by_hand(model, pairs)
    spec = PreferenceSpec(loss="dpo", beta=0.1)
    noise = torch.full_like(pc, TIE / 10)
    task = PreferenceTask(pairs, spec, batch_size=3, pad_id=0, seed=0,
                          ref_chosen=pc.detach() - noise, ref_rejected=pr.detach())
    m = evaluate_pairs(model, task, Runtime.cpu())
    assert m["reward_accuracy"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.softplus(
        -0.1 * noise).mean()), rel=1e-4)


def test_held_out_metrics_are_means_over_every_pair(one_thread):
    model = tiny_llama(VOCAB)
    pairs = _pairs(7)
    g = torch.Generator().manual_seed(3)
    rc, rr = torch.randn(7, generator=g), torch.randn(7, generator=g)
    task = PreferenceTask(pairs, PreferenceSpec(loss="dpo", beta=0.5), batch_size=3,
                          pad_id=0, seed=0, ref_chosen=rc, ref_rejected=rr)
    m = evaluate_pairs(model, task, Runtime.cpu())
    pc, pr, _, _ = _by_hand(model, pairs)
    want, cr, rj = losses.dpo(pc, pr, rc, rr, beta=0.5)
    assert m["loss"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert m["reward_accuracy"] == pytest.approx(float((cr - rj > TIE).float().mean()))
    assert model.training is False                      # evaluation left the mode as it was
