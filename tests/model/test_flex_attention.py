"""Flex attention with a block mask read from positions (``starpo.model.attention.flex_sdpa``)
equals the dense computation, on CPU, for prefix-shared, padding-free and packed SFT rows.

What this proves and what not. torch 2.13's CPU flex attention is the unfused reference
implementation (it materialises the scores) and its public API refuses a backward on CPU.
Values are checked through the public API without gradients. Gradients are checked through
the same operator's reference autograd (torch's dense math backward) with the CPU guard
lifted in the test: that proves our block mask, mask function and plumbing, not the fused
CUDA kernel, which tests/model/test_gpu_attention.py compares on a GPU."""

from __future__ import annotations

import pytest
import torch

from starpo.data.packing import layout_sft, sft_microbatches
from starpo.data.prefbatch import collate_padding_free, collate_prefix_shared
from starpo.model import attention as A
from starpo.model.logprobs import plain_sequence_logprobs, sequence_logprobs
from attention_cases import FlexCalls, assert_same, docs, lift_cpu_guard, llama, pairs, run

# the CPU kernel is the unfused reference (the module docstring says so); its warning is noise here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def batches(layout: str):
    """(fast batch, reference batch for plain_sequence_logprobs): same sequences."""
    if layout == "sft_flat":
        lay = layout_sft(docs(12), mode="pack", loss_masking=True, max_length=40)
        kw = dict(batch_size=4, pad_id=0, seed=0, epoch=0)
        return sft_microbatches(lay, flat=True, **kw)[0], sft_microbatches(lay, **kw)[0]
    ps = pairs(7, seed=5)
    if layout == "padding_free":
        return collate_padding_free(ps, max_tokens_per_row=60), collate_padding_free(ps, 30)
    return collate_prefix_shared(ps, dense_mask=False), collate_prefix_shared(ps, 40)


def dense_reference(layout: str, fast):
    """The token mask a row of ``fast`` must get, built the plain way."""
    if layout == "prefix_shared":
        ps = pairs(7, seed=5)
        return collate_prefix_shared(ps, None).attention_mask[:, 0]   # same one-row layout
    pos = fast.position_ids
    doc = (pos == 0).cumsum(1)
    n = pos.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


def token_mask(bm_fn, rows: int, n: int) -> torch.Tensor:
    q = torch.arange(n)[:, None].expand(n, n)
    kv = torch.arange(n)[None].expand(n, n)
    return torch.stack([bm_fn(torch.full_like(q, b), 0, q, kv) for b in range(rows)])


def listed_blocks(num, idx, nq, nkv) -> torch.Tensor:
    out = torch.zeros(num.shape[0], nq, nkv, dtype=torch.bool)
    for b in range(num.shape[0]):
        for i in range(nq):
            out[b, i, idx[b, 0, i, :num[b, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("layout", ["sft_flat", "padding_free", "prefix_shared"])
def test_block_mask_lists_every_allowed_block_and_only_true_full_ones(layout, block):
    fast, _ = batches(layout)
    rows, n = fast.input_ids.shape
    plans = [A._segments(r) for r in fast.position_ids]
    seg, side = A.token_layout(plans, n)
    want = dense_reference(layout, fast)
    if layout == "prefix_shared":
        want = want[:, :n, :n]
    got = token_mask(A.mask_fn(seg, side), rows, n)
    assert torch.equal(got, want)
    bm = A.block_mask(seg, side, block)
    nb = -(-n // block)
    pad = torch.zeros(rows, nb * block, nb * block, dtype=torch.bool)
    pad[:, :n, :n] = want
    tiles = pad.view(rows, nb, block, nb, block)
    any_, all_ = tiles.any((2, 4)), tiles.all((2, 4))
    partial = listed_blocks(bm.kv_num_blocks, bm.kv_indices, nb, nb)
    full = listed_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nb, nb)
    assert not (partial & full).any()
    assert ((partial | full) >= any_).all()        # nothing allowed is skipped
    assert (all_ >= full).all()                     # a full block is all allowed
    assert (partial | full).sum() < rows * nb * (nb + 1) // 2 or nb == 1   # it is sparse
    if layout == "prefix_shared" and block == 8:
        assert full.any()


@pytest.mark.parametrize("layout", ["sft_flat", "padding_free", "prefix_shared"])
def test_flex_values_equal_the_dense_computation(monkeypatch, layout):
    flex, sdpa = llama(2, "flex_attention"), llama(2, "sdpa")
    assert A.local_attention(flex) == "flex"
    fast_b, ref_b = batches(layout)
    calls = FlexCalls(monkeypatch)
    with torch.no_grad():
        fast = sequence_logprobs(flex, fast_b)[0]
        plain = plain_sequence_logprobs(sdpa, ref_b)[0]
    assert calls.flex == 2 and calls.seg == 0           # once per layer, flex itself
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [16, A.BLOCK])
@pytest.mark.parametrize("layout", ["sft_flat", "padding_free", "prefix_shared"])
def test_flex_gradients_equal_the_dense_computation(monkeypatch, layout, block):
    lift_cpu_guard(monkeypatch)
    monkeypatch.setattr(A, "BLOCK", block)          # 16: many empty, partial and full blocks
    flex, sdpa = llama(4, "flex_attention"), llama(4, "sdpa")
    fast_b, ref_b = batches(layout)
    calls = FlexCalls(monkeypatch)
    fast = run(flex, sequence_logprobs, fast_b)
    assert calls.flex == 2 and calls.seg == 0
    plain = run(sdpa, plain_sequence_logprobs, ref_b)
    # per-sequence sums and gradients (per-target order follows the rows, which differ)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


def test_flex_on_cpu_with_gradients_runs_segment_attention(monkeypatch):
    """Without the test's guard lift, a CPU training forward of a flex model computes the
    same function per segment (torch has no CPU flex backward)."""
    flex, sdpa = llama(4, "flex_attention"), llama(4, "sdpa")
    fast_b, ref_b = batches("prefix_shared")
    calls = FlexCalls(monkeypatch)
    fast = run(flex, sequence_logprobs, fast_b)
    assert calls.flex == 2 and calls.seg == 2
    plain = run(sdpa, plain_sequence_logprobs, ref_b)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


def test_prefix_shared_rows_of_a_flash_model_run_flex(monkeypatch):
    """A flash-attention model (its kernel named only; flash never runs for these rows)
    gets its mask-free prefix-shared rows through flex attention."""
    lift_cpu_guard(monkeypatch)
    model, sdpa = llama(2, "sdpa"), llama(2, "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    fast_b, ref_b = batches("prefix_shared")
    calls = FlexCalls(monkeypatch)
    fast = run(model, sequence_logprobs, fast_b)
    assert calls.flex == 2 and calls.seg == 0
    assert model.config._attn_implementation == "flash_attention_2"     # restored
    plain = run(sdpa, plain_sequence_logprobs, ref_b)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


def test_flex_rejects_what_it_does_not_implement():
    q = torch.zeros(1, 4, 5, 8)
    pos = torch.arange(5)[None]
    with pytest.raises(ValueError, match="position_ids"):
        A.flex_sdpa(None, q, q, q, None)
    with pytest.raises(ValueError, match="softcapping"):
        A.flex_sdpa(None, q, q, q, None, position_ids=pos, softcap=30.0)
    with pytest.raises(ValueError, match="no attention mask"):
        A.flex_sdpa(None, q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool), position_ids=pos)
    with pytest.raises(ValueError, match="dropout"):
        A.flex_sdpa(None, q, q, q, None, 0.1, position_ids=pos)
