"""starpo.losses: hand-computed values, gradient signs, and parity with TRL 1.16."""

from __future__ import annotations

import math
import random

import pytest
import torch

from starpo import losses as L


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------

# One pair: policy chosen −10, rejected −14; reference chosen −11, rejected −12;
# 4 chosen tokens, 8 rejected tokens. r(yw) = 1, r(yl) = −2.
PC, PR, RC, RR, NC, NR = t(-10.0), t(-14.0), t(-11.0), t(-12.0), torch.tensor([4]), torch.tensor([8])


def test_dpo_hand_value():
    loss, cr, rr = L.dpo(PC, PR, RC, RR, beta=0.5)
    # h = 0.5 · (1 − (−2)) = 1.5
    assert loss.item() == pytest.approx(-logsig(1.5), abs=1e-12)
    assert loss.item() == pytest.approx(0.2014132779827524, abs=1e-12)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-1.0)


def test_dpo_label_smoothing_hand_value():
    loss, _, _ = L.dpo(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * -logsig(1.5) + 0.1 * -logsig(-1.5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # = 0.9·0.201413 + 0.1·1.701413
    assert loss.item() == pytest.approx(0.3514132779827524, abs=1e-12)


def test_ln_dpo_hand_value():
    loss, cr, rr = L.ln_dpo(PC, PR, RC, RR, NC, NR, beta=2.0)
    # h = 2 · (1/4 − (−2)/8) = 2 · 0.5 = 1
    assert loss.item() == pytest.approx(-logsig(1.0), abs=1e-12)
    assert loss.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_simpo_hand_value():
    loss, cr, rr = L.simpo(PC, PR, NC, NR, beta=2.0, gamma=1.0)
    # β·pc/nc = 2·(−10/4) = −5 ; β·pr/nr = 2·(−14/8) = −3.5 ; h = −5 + 3.5 − 1 = −2.5
    assert loss.item() == pytest.approx(-logsig(-2.5), abs=1e-12)
    assert loss.item() == pytest.approx(2.5788897342925496, abs=1e-12)
    assert cr.item() == pytest.approx(-5.0) and rr.item() == pytest.approx(-3.5)
    smooth, _, _ = L.simpo(PC, PR, NC, NR, beta=2.0, gamma=1.0, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * -logsig(-2.5) + 0.2 * -logsig(2.5), abs=1e-12)


def test_ipo_hand_value_summed_and_per_token():
    loss, cr, rr = L.ipo(PC, PR, RC, RR, beta=0.25)
    # h = 1 − (−2) = 3 ; 1/(2β) = 2 ; (3 − 2)² = 1
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert cr.item() == pytest.approx(0.25) and rr.item() == pytest.approx(-0.5)
    loss_tok, cr2, _ = L.ipo(PC, PR, RC, RR, NC, NR, beta=0.25)
    # h = 1/4 − (−2)/8 = 0.5 ; (0.5 − 2)² = 2.25 ; rewards unchanged (summed)
    assert loss_tok.item() == pytest.approx(2.25, abs=1e-12)
    assert cr2.item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        L.ipo(PC, PR, RC, RR, NC, None, beta=0.25)


def test_batched_shapes_and_dispatcher():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    nc, nr = torch.randint(1, 30, (5,), generator=g), torch.randint(1, 30, (5,), generator=g)
    for name in L.LOSSES:
        out = L.preference_loss(name, pc, pr, rc, rr, nc, nr, beta=0.3, gamma=0.4)
        assert all(x.shape == (5,) for x in out)
    torch.testing.assert_close(L.preference_loss("dpo", pc, pr, rc, rr, nc, nr, beta=0.3)[0],
                               L.dpo(pc, pr, rc, rr, beta=0.3)[0])
    torch.testing.assert_close(L.preference_loss("ipo_per_token", pc, pr, rc, rr, nc, nr, beta=0.3)[0],
                               L.ipo(pc, pr, rc, rr, nc, nr, beta=0.3)[0])
    torch.testing.assert_close(L.preference_loss("ipo", pc, pr, rc, rr, nc, nr, beta=0.3)[0],
                               L.ipo(pc, pr, rc, rr, beta=0.3)[0])
    # SimPO needs no reference
    L.preference_loss("simpo", pc, pr, None, None, nc, nr, beta=2.0, gamma=0.5)
    assert not L.needs_reference("simpo") and L.needs_reference("ln_dpo")
    with pytest.raises(ValueError, match="reference"):
        L.preference_loss("dpo", pc, pr, beta=0.1)
    with pytest.raises(ValueError, match="counts"):
        L.preference_loss("ln_dpo", pc, pr, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.preference_loss("ipo", pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown"):
        L.preference_loss("kto", pc, pr, rc, rr, beta=0.1)
    with pytest.raises(ValueError):
        L.dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)


def test_sft_nll_sum():
    from starpo.losses.sft import nll_sum
    assert nll_sum(t(-1.0, -2.0, -3.0)).item() == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------
# gradient signs: minimising the loss raises chosen and lowers rejected log-probs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", L.LOSSES)
def test_gradient_signs(name):
    pc, pr = t(-10.0, -3.0).requires_grad_(), t(-12.0, -2.0).requires_grad_()
    rc, rr = t(-10.5, -3.0), t(-11.0, -2.5)
    nc, nr = torch.tensor([5, 2]), torch.tensor([6, 3])
    # a small β keeps IPO below its target margin, so its gradient pushes the margin up
    beta = 0.1
    losses, cr, rr_ = L.preference_loss(name, pc, pr, rc, rr, nc, nr, beta=beta, gamma=0.5,
                                        label_smoothing=0.0 if name.startswith("ipo") else 0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not cr.requires_grad and not rr_.requires_grad
    if name != "simpo":          # the reference is a constant
        assert rc.grad is None


def test_label_smoothing_pulls_back_confident_pairs():
    """With ε > 0 a pair already far on the right side gets pushed back (conservative DPO)."""
    pc, pr = t(0.0).requires_grad_(), t(-100.0).requires_grad_()
    loss, _, _ = L.dpo(pc, pr, t(0.0), t(0.0), beta=1.0, label_smoothing=0.2)
    loss.backward()
    assert pc.grad.item() > 0          # gradient descent lowers the already huge margin


# ---------------------------------------------------------------------------------------
# parity with TRL 1.16 on a tiny model and batch
# ---------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float()


def text_rows(n: int = 6):
    rng = random.Random(1)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": words(rng.randint(2, 7)), "chosen": " " + words(rng.randint(1, 6)),
             "rejected": " " + words(rng.randint(1, 6))} for _ in range(n)]


def our_logps(model, pairs, layout):
    from starpo.model.logprobs import sequence_logprobs
    from starpo.data.prefbatch import collate_padded, collate_prefix_shared, split_pairs

    batch = collate_padded(pairs, 0) if layout == "padded" else collate_prefix_shared(pairs)
    sums, counts, _ = sequence_logprobs(model, batch, chunk_size=7)
    return (*split_pairs(sums), *split_pairs(counts))


@pytest.fixture(scope="module")
def trl_dpo():
    pytest.importorskip("trl")
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref = tiny_llama(0), tiny_llama(1)
    tmp = tempfile.mkdtemp(prefix="starpo-trl-")

    def make(loss_type, beta):
        args = DPOConfig(output_dir=tmp, loss_type=[loss_type], beta=beta, report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False,
                         max_length=None, per_device_train_batch_size=6, save_strategy="no")
        return DPOTrainer(model=policy, ref_model=ref, args=args,
                          train_dataset=Dataset.from_list(text_rows()),
                          processing_class=tiny_tokenizer())

    return make, policy, ref


@pytest.mark.parametrize("loss_type,ours,beta", [("sigmoid", "dpo", 0.3),
                                                 ("sigmoid_norm", "ln_dpo", 2.0),
                                                 ("ipo", "ipo_per_token", 0.4)])
@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_parity_with_trl_dpo_trainer(trl_dpo, loss_type, ours, beta, layout):
    make, policy, ref = trl_dpo
    trainer = make(loss_type, beta)
    ds = trainer.train_dataset
    examples = [ds[i] for i in range(len(ds))]
    inputs = trainer.data_collator(examples)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]

    # TRL's own tokenization; every completion token is trained (TRL's completion_mask)
    pairs = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"],
              "chosen_labels": e["chosen_ids"], "rejected_ids": e["rejected_ids"],
              "rejected_labels": e["rejected_ids"]} for e in examples]
    pc, pr, nc, nr = our_logps(policy, pairs, layout)
    with torch.no_grad():
        rc, rr, _, _ = our_logps(ref, pairs, layout)
    losses, cr, rj = L.preference_loss(ours, pc, pr, rc, rr, nc, nr, beta=beta)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    if ours == "ln_dpo":
        # TRL logs β·r(y) for every loss type; the LN-DPO reward of docs/losses.md is β·r(y)/|y|
        torch.testing.assert_close(cr, beta * (pc - rc).detach() / nc)
        cr, rj = beta * (pc - rc), beta * (pr - rr)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert rj.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert pc.mean().item() == pytest.approx(metrics["logps/chosen"][-1], abs=1e-5)

    # and the gradients agree too
    policy.zero_grad()
    trainer._compute_loss(trainer.model, inputs, return_outputs=False).backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    pc, pr, nc, nr = our_logps(policy, pairs, layout)
    L.preference_loss(ours, pc, pr, rc, rr, nc, nr, beta=beta)[0].mean().backward()
    for g_trl, p in zip(trl_grads, policy.parameters()):
        torch.testing.assert_close(p.grad, g_trl, atol=1e-5, rtol=1e-4)
    policy.zero_grad()


def test_parity_with_trl_cpo_simpo():
    pytest.importorskip("trl")
    import tempfile

    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma, eps = 2.0, 0.7, 0.1
    policy = tiny_llama(2)
    args = CPOConfig(output_dir=tempfile.mkdtemp(prefix="starpo-cpo-"), loss_type="simpo",
                     cpo_alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                     report_to="none", use_cpu=True, bf16=False, max_length=64,
                     remove_unused_columns=False, save_strategy="no")
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(text_rows()),
                         processing_class=tiny_tokenizer())
    ds = trainer.train_dataset
    examples = [ds[i] for i in range(len(ds))]
    batch = trainer.data_collator(examples)
    # TRL: length-averaged log-probs from full logits, then cpo_loss
    avg_c, avg_r = trainer.concatenated_forward(policy, batch)[:2]
    trl_losses, trl_cr, trl_rr = trainer.cpo_loss(avg_c, avg_r)

    pairs = []
    for e in examples:
        n = len(e["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            assert e[f"{side}_input_ids"][:n] == e["prompt_input_ids"]
        pairs.append({"prompt_ids": e["prompt_input_ids"],
                      "chosen_ids": e["chosen_input_ids"][n:], "chosen_labels": e["chosen_labels"][n:],
                      "rejected_ids": e["rejected_input_ids"][n:],
                      "rejected_labels": e["rejected_labels"][n:]})
    pc, pr, nc, nr = our_logps(policy, pairs, "prefix_shared")
    losses, cr, rr = L.simpo(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(losses, trl_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(cr, trl_cr, atol=1e-5, rtol=0)
    torch.testing.assert_close(rr, trl_rr, atol=1e-5, rtol=0)
