"""Shared cases of the attention tests (tests/model/test_attention*.py, test_flex_attention.py):
a tiny Llama, random SFT documents and preference pairs, and a log-prob + gradient run."""

from __future__ import annotations

import random

import torch

from starpo.data.tokenize import IGNORE, TokenizedSFT
from starpo.model import attention as A

VOCAB = 61


def llama(kv_heads: int = 4, attn: str = "sdpa", seed: int = 0):
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads,
                        intermediate_size=64, max_position_embeddings=512)
    return T.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).float().eval()


def docs(n: int = 9, seed: int = 0) -> list[TokenizedSFT]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(2, 12), rng.randint(1, 15)
        ids = [rng.randrange(1, VOCAB) for _ in range(p + r)]
        out.append(TokenizedSFT(ids, [IGNORE] * p + ids[p:], "t", i))
    return out


def pairs(n: int = 5, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 9))]
        ch = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        rj = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        out.append({"prompt_ids": prompt, "chosen_ids": ch, "chosen_labels": ch,
                    "rejected_ids": rj, "rejected_labels": rj})
    return out


def run(model, fn, batch):
    model.zero_grad()
    sums, counts, per = fn(model, batch)
    (sums * torch.linspace(0.5, 1.5, sums.numel())).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return sums.detach(), per.detach(), grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], atol=1e-5, rtol=1e-4, msg=k)


class FlexCalls:
    """Counts calls of flex_sdpa and of segment_sdpa (which kernel really ran)."""

    def __init__(self, monkeypatch):
        self.flex = self.seg = 0
        flex, seg = A.flex_sdpa, A.segment_sdpa

        def f(*a, **k):
            self.flex += 1
            return flex(*a, **k)

        def s(*a, **k):
            self.seg += 1
            return seg(*a, **k)
        monkeypatch.setattr(A, "flex_sdpa", f)
        monkeypatch.setattr(A, "segment_sdpa", s)


def lift_cpu_guard(monkeypatch):
    """Let flex attention's reference autograd run on CPU (see the module docstring)."""
    import torch.nn.attention.flex_attention as FA
    monkeypatch.setattr(FA, "_validate_device", lambda *a: None)
    monkeypatch.setattr(A, "_flex_has_backward", lambda device: True)
