"""The varlen kernel (``starpo.model.attention.varlen_sdpa``): one attention call per layer
for every packed document and prefix-shared pair of a micro-batch, chosen by itself on CUDA.

What runs here and what it proves. torch's varlen kernel (flash attention) exists only on
CUDA. On CPU the tests put ``varlen_dense`` in its place — the kernel's meaning written as
one masked sdpa call (bottom-right causal per sequence) — which proves starpo's side: the
sequence boundaries and gathered keys read from ``position_ids``, the row order of the
output, values and gradients equal to the dense-mask reference (float64), the dispatch
(which kernel a model on which device gets), the adapter over torch's changing signature,
the start-up check that rejects a kernel of other semantics, and the structural guard:
the number of kernel calls per forward does not grow with the number of documents. The
fused kernel's own arithmetic is checked against the same specification by that start-up
check on a GPU and by tests/model/test_gpu_attention.py."""

from __future__ import annotations

import pytest
import torch

from starpo.data.packing import layout_sft, sft_microbatches
from starpo.data.prefbatch import collate_padding_free, collate_prefix_shared
from starpo.model import attention as A
from starpo.model.logprobs import plain_sequence_logprobs, sequence_logprobs
from attention_cases import assert_same, docs, llama, pairs, run


class KernelCalls:
    """Stands ``varlen_dense`` in for torch's kernel on any device, counting its calls."""

    def __init__(self, monkeypatch):
        self.n = 0

        def kernel(*a, **k):
            self.n += 1
            return A.varlen_dense(*a, **k)
        monkeypatch.setattr(A, "_varlen_kernel", lambda q, scaling, dropout: kernel)
        monkeypatch.setattr(A, "varlen_device", lambda device: True)


def varlen_model(kv_heads=2, dtype=torch.float64):
    model = llama(kv_heads).to(dtype)
    model.starpo_packed_attention = "varlen"
    return model


def batches(layout: str, n: int = 12):
    """(fast batch: one unpadded row, reference batch for plain_sequence_logprobs)."""
    if layout == "sft_flat":
        lay = layout_sft(docs(n), mode="pack", loss_masking=True, max_length=40)
        kw = dict(batch_size=4, pad_id=0, seed=0, epoch=0)
        return sft_microbatches(lay, flat=True, **kw)[0], sft_microbatches(lay, **kw)[0]
    if layout == "sft_rows":      # several packed rows, no mask: flattened to [B·L]
        lay = layout_sft(docs(n), mode="pack", loss_masking=True, max_length=40)
        b = sft_microbatches(lay, batch_size=3, pad_id=0, seed=0, epoch=0)[0]
        return b, b
    ps = pairs(7, seed=5)
    if layout == "padding_free":
        return collate_padding_free(ps, max_tokens_per_row=None), collate_padding_free(ps, 30)
    return collate_prefix_shared(ps, dense_mask=False), collate_prefix_shared(ps, 40)


def test_layout_of_documents_and_prefix_shared_pairs():
    # row 0: documents of 3 and 2 tokens; row 1: a pair (prompt 2, chosen 2, rejected 3)
    # then a document of 1 token
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0],
                        [0, 1, 2, 3, 2, 3, 4]])
    plans = [A._segments(r) for r in pos]
    lay = A.varlen_layout(plans, 7)
    assert lay.cu_q.tolist() == [0, 3, 5, 6, 7, 11, 14]
    # the rejected response's keys: the prompt (2 tokens) gathered before it
    assert lay.cu_k.tolist() == [0, 3, 5, 6, 7, 11, 16]
    assert (lay.max_q, lay.max_k) == (4, 5)
    assert lay.k_index.tolist() == [0, 1, 2, 3, 4, 5, 6,
                                    7, 8, 9, 10,      # prompt · chosen
                                    7, 8, 11, 12, 13]  # prompt · rejected
    docs_only = A.varlen_layout([A._segments(pos[0])], 7)
    assert docs_only.k_index is None and torch.equal(docs_only.cu_q, docs_only.cu_k)


def test_dense_specification_is_bottom_right_causal_per_sequence():
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k = [4, 2, 3], [4, 5, 3]
    q = torch.randn(sum(lens_q), 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 8, generator=g, dtype=torch.float64)
    cq = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    ck = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    got = A.varlen_dense(q, k, v, cq, ck, 4, 5, gqa=True)
    for s in range(3):
        qs, ks = q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]].repeat_interleave(2, 1)
        vs = v[ck[s]:ck[s + 1]].repeat_interleave(2, 1)
        nq, nk = qs.shape[0], ks.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / 8 ** 0.5
        allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -torch.inf)
                            .softmax(-1), vs)
        torch.testing.assert_close(got[cq[s]:cq[s + 1]], want)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("layout", ["sft_flat", "sft_rows", "padding_free", "prefix_shared"])
def test_varlen_equals_the_dense_computation(monkeypatch, layout, kv_heads):
    """Values and gradients in float64 against transformers' own sdpa with the plain
    (padded or dense-mask) batch."""
    calls = KernelCalls(monkeypatch)
    model = varlen_model(kv_heads)
    fast_b, ref_b = batches(layout)
    assert A.attention_for(model, fast_b.attention_mask,
                           prefix_shared=layout == "prefix_shared") == "varlen"
    fast = run(model, sequence_logprobs, fast_b)
    assert calls.n == 2                                    # one call per layer
    plain = run(model, plain_sequence_logprobs, ref_b)
    assert calls.n == 2
    # per-sequence sums and gradients (per-target order follows the rows, which differ)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


@pytest.mark.parametrize("layout", ["sft_flat", "prefix_shared"])
def test_kernel_calls_do_not_grow_with_the_number_of_documents(monkeypatch, layout):
    """The regression guard of the GPU path: one varlen call per layer whatever the number
    of packed documents (or pairs); the CPU's per-document loop, for contrast, grows."""
    calls = KernelCalls(monkeypatch)
    model = varlen_model()
    seg_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_sdpa(*a, **k):
        seg_calls.append(1)
        return real_sdpa(*a, **k)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", counted_sdpa)
    seen = {}
    for n in (4, 40):
        if layout == "sft_flat":            # every packed row in one micro-batch
            lay = layout_sft(docs(n), mode="pack", loss_masking=True, max_length=40)
            b = sft_microbatches(lay, batch_size=n, pad_id=0, seed=0, epoch=0, flat=True)[0]
        else:
            b = collate_prefix_shared(pairs(n, seed=2), dense_mask=False)
        docs_in_row = int((b.position_ids == 0).sum())
        calls.n, seg_calls[:] = 0, []
        with torch.no_grad():
            sequence_logprobs(model, b)
        seen[n] = (docs_in_row, calls.n, len(seg_calls))
        model.starpo_packed_attention = "segments"
        seg_calls[:] = []
        with torch.no_grad():
            sequence_logprobs(model, b)
        seen[n] += (len(seg_calls),)
        model.starpo_packed_attention = "varlen"
    (d4, k4, s4, loop4), (d40, k40, s40, loop40) = seen[4], seen[40]
    assert d40 > 5 * d4
    assert k4 == k40 == 2 and s4 == s40 == 2          # 2 layers: one kernel call each
    assert loop4 == 2 * d4 and loop40 == 2 * d40      # the loop: one per document per layer


def test_dispatch_by_device_recipe_and_model(monkeypatch):
    model = llama()
    assert A.local_attention(model) == "segments"            # CPU: the per-document loop
    monkeypatch.setattr(A, "_device", lambda core: torch.device("cuda"))
    monkeypatch.setattr(A, "varlen_device", lambda device: True)
    assert A.local_attention(model) == A.prefix_attention(model) == "varlen"
    assert A.one_row_batches(model, prefix_shared=True)
    assert "varlen" in A.describe(model)
    model.starpo_packed_attention = "flex"                  # the recipe forces a kernel
    assert A.local_attention(model) == "flex"
    model.starpo_packed_attention = "segments"
    assert A.local_attention(model) == "segments"
    model.starpo_packed_attention = "auto"
    monkeypatch.setattr(A, "varlen_device", lambda device: False)   # torch without varlen
    assert A.local_attention(model) == "flex"
    model.config._attn_implementation = "flash_attention_2"
    assert A.local_attention(model) == "flash"               # packed docs: flash's own
    monkeypatch.setattr(A, "varlen_device", lambda device: True)
    assert A.prefix_attention(model) == "varlen"             # its prefix-shared rows
    model.starpo_segment_attention = False
    assert A.prefix_attention(model) is None


def test_a_kernel_the_device_lacks_falls_back_and_the_log_says_so():
    model = llama()
    model.starpo_packed_attention = "varlen"                 # a GPU recipe on a laptop
    assert A.local_attention(model) == "segments"
    line = A.describe(model)
    assert line.startswith("attention: segments") and "varlen is not available on cpu" in line


def test_inputs_the_fused_kernel_cannot_take_run_flex(monkeypatch):
    """fp32 without autocast (or CPU tensors) cannot go through flash varlen: the varlen
    function hands the call to the flex kernel (on CPU with gradients: segments)."""
    q = torch.zeros(1, 4, 5, 8)
    assert A._varlen_kernel(q, None, 0.0) is None
    monkeypatch.setattr(A, "_fallback_warned", set())
    monkeypatch.setattr(A, "varlen_device", lambda device: True)
    model = varlen_model(dtype=torch.float32)
    flex_calls = []
    real = A.flex_sdpa
    monkeypatch.setattr(A, "flex_sdpa", lambda *a, **k: flex_calls.append(1) or real(*a, **k))
    fast_b, ref_b = batches("prefix_shared")
    with pytest.warns(UserWarning, match="varlen attention cannot take"):
        fast = run(model, sequence_logprobs, fast_b)
    assert len(flex_calls) == 2
    plain = run(model, plain_sequence_logprobs, ref_b)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


def test_varlen_rejects_what_it_does_not_implement():
    q = torch.zeros(1, 4, 5, 8)
    pos = torch.arange(5)[None]
    with pytest.raises(ValueError, match="position_ids"):
        A.varlen_sdpa(None, q, q, q, None)
    with pytest.raises(ValueError, match="softcapping"):
        A.varlen_sdpa(None, q, q, q, None, position_ids=pos, softcap=30.0)
    with pytest.raises(ValueError, match="no attention mask"):
        A.varlen_sdpa(None, q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool),
                      position_ids=pos)
    with pytest.raises(ValueError, match="KV cache"):
        A.varlen_sdpa(None, q, q[:, :, :3], q[:, :, :3], None, position_ids=pos)


def _case(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 4, 8, generator=g).to(dtype)
    k = torch.randn(9, 2, 8, generator=g).to(dtype)
    v = torch.randn(9, 2, 8, generator=g).to(dtype)
    return q, k, v, torch.tensor([0, 4, 7], dtype=torch.int32), \
        torch.tensor([0, 4, 9], dtype=torch.int32), 4, 5


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.12"])
def test_adapter_speaks_each_torch_signature(monkeypatch, release):
    """torch 2.9/2.10 take ``is_causal`` and no ``enable_gqa``/``scale``; 2.11 (the lent
    GPU machine's) ``window_size=(-1, 0)`` for causal (a tuple: it compares with ``==``)
    and ``scale`` but no ``enable_gqa``; 2.12+ all three."""
    import torch.nn.attention.varlen as V
    seen = {}
    if release == "2.10":
        def fake(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            seen.update(is_causal=is_causal, heads=k.shape[1])
            return A.varlen_dense(q, k, v, cu_q, cu_k, max_q, max_k) if is_causal else None
    elif release == "2.11":     # torch 2.11.0's signature, read from its wheel
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                 scale=None, window_size=(-1, -1)):
            seen.update(window=window_size, heads=key.shape[1])
            causal = window_size == (-1, 0)
            return A.varlen_dense(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                  scale=scale) if causal else None
    else:
        def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                 num_splits=None):
            seen.update(window=window_size, heads=k.shape[1], gqa=enable_gqa)
            causal = window_size == (-1, 0)
            return A.varlen_dense(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                                  gqa=enable_gqa) if causal else None
    monkeypatch.setattr(V, "varlen_attn", fake)
    A._varlen_signature.cache_clear()
    try:
        case = _case()
        got = A.torch_varlen(*case, gqa=True)
        torch.testing.assert_close(got, A.varlen_dense(*case, gqa=True))
        if release == "2.10":
            assert seen == {"is_causal": True, "heads": 4}        # heads repeated for GQA
        elif release == "2.11":
            assert seen == {"window": (-1, 0), "heads": 4}
        else:
            assert seen == {"window": (-1, 0), "heads": 2, "gqa": True}
    finally:
        A._varlen_signature.cache_clear()


def test_start_up_check_rejects_a_kernel_of_other_semantics(monkeypatch):
    """A kernel whose causal mask is aligned top-left (as sdpa's is when query and key
    lengths differ) would let nothing of the prompt reach the rejected response's first
    tokens: the check catches it and the model gets flex instead."""
    def top_left(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, gqa=False):
        out = torch.empty_like(q)
        for s in range(len(cu_q) - 1):
            a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            o = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                v[c:d].transpose(0, 1)[None], is_causal=True, enable_gqa=gqa)
            out[a:b] = o[0].transpose(0, 1)
        return out
    cpu = torch.device("cpu")
    monkeypatch.setattr(A, "torch_varlen", lambda *a, **k: A.varlen_dense(*a, **k))
    A._varlen_probe.cache_clear()
    assert A._varlen_probe(cpu)
    # first asked for inside a reference pass or an evaluation: the check still runs
    A._varlen_probe.cache_clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert A._varlen_probe(cpu)
    A._varlen_probe.cache_clear()
    with torch.inference_mode():
        assert A._varlen_probe(cpu)
    monkeypatch.setattr(A, "torch_varlen", top_left)
    A._varlen_probe.cache_clear()
    with pytest.warns(UserWarning, match="differs from its specification"):
        assert not A._varlen_probe(cpu)
    A._varlen_probe.cache_clear()


@pytest.mark.parametrize("wrong", ["key", "value"])
def test_start_up_check_rejects_a_kernel_with_a_wrong_backward(monkeypatch, wrong):
    """Training runs the kernel's backward, a separate kernel: one whose forward is right
    but whose gradient is not (here: one input's gradient halved) is not used either."""
    class HalfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g / 2

    def kernel(q, k, v, *a, **kw):
        k, v = (HalfGrad.apply(k), v) if wrong == "key" else (k, HalfGrad.apply(v))
        return A.varlen_dense(q, k, v, *a, **kw)
    cpu = torch.device("cpu")
    monkeypatch.setattr(A, "torch_varlen", kernel)
    A._varlen_probe.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"with respect to the {wrong} differs"):
            assert not A._varlen_probe(cpu)
    finally:
        A._varlen_probe.cache_clear()


@pytest.mark.parametrize("layout", ["sft_flat", "prefix_shared"])
def test_checkpointing_recomputes_with_the_varlen_kernel(monkeypatch, layout):
    """Under the loop's gradient checkpointing each layer's recomputation runs varlen again
    with the forward's layout, and loss and gradients are unchanged."""
    from starpo.train.loop import _enable_checkpointing
    calls = KernelCalls(monkeypatch)
    model = varlen_model().train()
    b = batches(layout)[0]
    plain = run(model, sequence_logprobs, b)
    assert calls.n == 2
    _enable_checkpointing(model)
    assert A.local_attention(model) == "varlen"
    ckpt = run(model, sequence_logprobs, b)
    assert calls.n == 2 + 2 * 2                          # forward + recomputation
    assert model.config._attn_implementation == "sdpa"
    assert A._state == {} and A._active == []
    assert_same(ckpt, plain)
