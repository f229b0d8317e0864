"""starpo.model.logprobs: the chunked LM-head path equals the plain full-logits path."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from starpo.data.batch import TokenBatch
from starpo.model.logprobs import (TargetLogprobs, logit_transform, model_attention_mask,
                             plain_sequence_logprobs, sequence_logprobs, target_logprobs,
                             verify_logit_head)
from starpo.data.prefbatch import collate_padded, collate_padding_free, collate_prefix_shared

VOCAB = 96


def plain_target_logprobs(hidden, weight, bias, targets, scale=1.0, softcap=None):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float() * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------
# target_logprobs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
@pytest.mark.parametrize("scale,softcap,use_bias", [(1.0, None, False), (0.7, None, True),
                                                    (2.0, 1.5, False), (1.0, 3.0, True)])
def test_target_logprobs_values_and_grads(chunk, scale, softcap, use_bias):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 10, 8, 17                                   # chunk sizes 3, 7 do not divide 10
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = nn.Linear(h, v, bias=use_bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
        if use_bias:
            head.bias.copy_(torch.randn(v, generator=g))
    targets = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)                      # a non-uniform upstream gradient

    fast = target_logprobs(hidden, head, targets, chunk_size=chunk, softcap=softcap, scale=scale)
    assert fast.dtype == torch.float32 and fast.shape == (n,)
    grads_fast = torch.autograd.grad((fast * up).sum(), [hidden, *head.parameters()])
    plain = plain_target_logprobs(hidden, head.weight, head.bias, targets, scale, softcap)
    grads_plain = torch.autograd.grad((plain * up).sum(), [hidden, *head.parameters()])
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_target_logprobs_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2, 1])
    # float64 in, float32 softmax: check against the plain path with float64 tolerance instead
    fn = lambda h, w: target_logprobs(h, w, targets, chunk_size=2, softcap=2.0, scale=0.5).double()
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_target_logprobs_weight_tensor_frozen_head_and_empty():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g)               # frozen head: no weight gradient
    targets = torch.randint(0, 9, (6,), generator=g)
    out = target_logprobs(hidden, weight, targets, chunk_size=4)
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    empty = target_logprobs(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)
    empty.sum().backward()                                 # connected, harmless
    with pytest.raises(ValueError):
        target_logprobs(hidden, weight, targets[:3])


def test_chunked_path_never_saves_full_logits():
    """Autograd keeps only the inputs: no [N, V] tensor survives the forward."""
    n, h, v = 256, 16, 4096
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        target_logprobs(hidden, weight, targets, chunk_size=32)
    chunked = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        plain_target_logprobs(hidden, weight, None, targets)
    plain = sum(saved)
    logits_bytes = n * v * 4
    inputs_bytes = (hidden.numel() + weight.numel()) * 4 + targets.numel() * 8
    assert chunked <= inputs_bytes
    assert plain >= logits_bytes


def test_target_logprobs_bf16_autocast_close():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(12, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = target_logprobs(hidden, weight, targets, chunk_size=5)
    out.sum().backward()
    assert out.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    ref = plain_target_logprobs(hidden.detach(), weight.detach(), None, targets)
    torch.testing.assert_close(out.detach(), ref, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------------------------------
# logit transforms read from configs
# ---------------------------------------------------------------------------------------


def test_logit_transform_from_configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == (1.0, None)
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)


# ---------------------------------------------------------------------------------------
# sequence_logprobs on real (tiny) models
# ---------------------------------------------------------------------------------------


def random_pairs(seed=0, n=4):
    rng = random.Random(seed)

    def toks(k):
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    pairs = []
    for i in range(n):
        p, c, r = toks(rng.randint(1, 8)), toks(rng.randint(1, 6)), toks(rng.randint(1, 6))
        c_lab = list(c)
        if len(c) > 2:
            c_lab[0] = -100                       # an untrained leading response token
        pairs.append({"prompt_ids": p, "chosen_ids": c, "chosen_labels": c_lab,
                      "rejected_ids": r, "rejected_labels": list(r)})
    return pairs


def make_model(kind: str, seed: int = 0, attn: str | None = None):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    if kind == "llama":
        model = T.LlamaForCausalLM._from_config(T.LlamaConfig(**common), attn_implementation=attn or "sdpa")
    elif kind == "llama_tied":
        model = T.LlamaForCausalLM(T.LlamaConfig(tie_word_embeddings=True, **common))
    elif kind == "gpt_neox":
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common))
    elif kind == "cohere":
        model = T.CohereForCausalLM(T.CohereConfig(logit_scale=0.3, **common))
    elif kind == "gemma2":
        # softcap 3 on logits made large below, sliding window 4 shorter than the rows
        cfg = T.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4,
                             final_logit_softcapping=3.0, **common)
        model = T.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(6.0)
    else:
        raise ValueError(kind)
    return model.float().eval()


def grads_of(model, fn, batch, **kw):
    model.zero_grad()
    sums, counts, per = fn(model, batch, **kw)
    weights = torch.linspace(0.5, 1.5, sums.numel())
    (sums * weights).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return sums.detach(), counts, per.detach(), out


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gpt_neox", "cohere", "gemma2"])
@pytest.mark.parametrize("layout", ["padded", "padding_free", "prefix_shared"])
def test_sequence_logprobs_equals_plain(kind, layout):
    model = make_model(kind)
    pairs = random_pairs()
    batch = {"padded": lambda: collate_padded(pairs, 0),
             "padding_free": lambda: collate_padding_free(pairs, max_tokens_per_row=16),
             "prefix_shared": lambda: collate_prefix_shared(pairs, max_tokens_per_row=24)}[layout]()
    s_fast, c_fast, p_fast, g_fast = grads_of(model, sequence_logprobs, batch, chunk_size=5)
    s_plain, c_plain, p_plain, g_plain = grads_of(model, plain_sequence_logprobs, batch)
    torch.testing.assert_close(s_fast, s_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_fast, p_plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(c_fast, c_plain)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 0
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)
    # and every layout gives the padded numbers
    ref = plain_sequence_logprobs(model, collate_padded(pairs, 0))[0].detach()
    torch.testing.assert_close(s_fast, ref, atol=1e-5, rtol=1e-5)


def test_counts_and_per_target_order():
    model = make_model("llama")
    pairs = random_pairs(1, n=3)
    batch = collate_padding_free(pairs)
    sums, counts, per = sequence_logprobs(model, batch, chunk_size=4)
    expected = []
    for p in pairs:
        expected += [sum(x != -100 for x in p["chosen_labels"]), len(p["rejected_ids"])]
    assert counts.tolist() == expected
    assert per.shape == (batch.num_targets,)
    torch.testing.assert_close(sums, torch.zeros(6).index_add(0, batch.tgt_seq, per))


def test_wrapper_module_and_verify_head():
    model = make_model("llama")
    batch = collate_padded(random_pairs(), 0)
    wrapped = TargetLogprobs(model, chunk_size=3)
    torch.testing.assert_close(wrapped(batch)[0], sequence_logprobs(model, batch)[0])
    torch.testing.assert_close(sequence_logprobs(wrapped, batch)[0], sequence_logprobs(model, batch)[0])
    assert verify_logit_head(model) < 1e-4
    assert verify_logit_head(make_model("gemma2")) < 1e-4
    # a config that claims a transform the model does not apply is caught
    model.config.logit_scale = 3.0
    with pytest.raises(ValueError, match="differ"):
        verify_logit_head(model)


def test_4d_mask_rejected_for_unsupported_kernels():
    model = make_model("llama")
    batch = collate_prefix_shared(random_pairs())
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        model_attention_mask(model, batch)


def test_manual_batch_with_explicit_targets():
    """A TokenBatch built by hand: one row, two sequences sharing nothing special."""
    model = make_model("gpt_neox")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = TokenBatch(input_ids=ids, position_ids=torch.arange(6)[None], attention_mask=None,
                       tgt_row=torch.zeros(4, dtype=torch.long), tgt_pos=torch.tensor([0, 1, 3, 4]),
                       tgt_ids=torch.tensor([6, 7, 9, 10]), tgt_seq=torch.tensor([0, 0, 1, 1]),
                       num_seqs=3)
    sums, counts, per = sequence_logprobs(model, batch, chunk_size=3)
    logp = F.log_softmax(model(ids).logits[0].float(), -1)
    torch.testing.assert_close(per, torch.stack([logp[0, 6], logp[1, 7], logp[3, 9], logp[4, 10]]),
                               atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [2, 2, 0] and sums[2].item() == 0.0
