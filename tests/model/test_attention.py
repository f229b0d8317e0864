"""Segment-local attention (starpo.model.attention) equals transformers' whole-row attention,
and one-row SFT micro-batches equal the multi-row ones."""

from __future__ import annotations

import pytest
import torch

from starpo.model import attention as A
from starpo.data.packing import layout_sft, padding_fraction, sft_microbatches
from starpo.model.logprobs import plain_sequence_logprobs, sequence_logprobs
from starpo.data.prefbatch import collate_padded, collate_padding_free, collate_prefix_shared
from attention_cases import VOCAB, assert_same, docs, llama, pairs, run


class Calls:
    """Counts calls of starpo.model.attention.segment_sdpa (to prove the fast path ran)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = A.segment_sdpa

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(A, "segment_sdpa", counted)


@pytest.mark.parametrize("kv_heads,attn", [(4, "sdpa"), (2, "sdpa"), (4, "eager")])
@pytest.mark.parametrize("layout", ["sft_rows", "sft_flat", "padding_free", "prefix_shared"])
def test_segments_equal_whole_row_attention(monkeypatch, kv_heads, attn, layout):
    model = llama(kv_heads, attn)
    if layout.startswith("sft"):
        lay = layout_sft(docs(), mode="pack", loss_masking=True, max_length=40)
        batch = sft_microbatches(lay, batch_size=3, pad_id=0, seed=0, epoch=0,
                                 flat=layout == "sft_flat")[0]
    elif layout == "padding_free":
        batch = collate_padding_free(pairs(), max_tokens_per_row=30)
    else:
        batch = collate_prefix_shared(pairs(), max_tokens_per_row=40)
    calls = Calls(monkeypatch)
    fast = run(model, sequence_logprobs, batch)
    assert calls.n == 2            # once per layer (backward reuses the graph)
    plain = run(model, plain_sequence_logprobs, batch)
    assert calls.n == 2            # the reference path is transformers' own kernel
    assert_same(fast, plain)


def test_flat_microbatches_equal_rows_and_have_no_padding():
    model = llama()
    lay = layout_sft(docs(20), mode="pack", loss_masking=True, max_length=40)
    rows = sft_microbatches(lay, batch_size=4, pad_id=0, seed=3, epoch=1)
    flat = sft_microbatches(lay, batch_size=4, pad_id=0, seed=3, epoch=1, flat=True)
    assert len(rows) == len(flat) > 1
    assert padding_fraction(rows) > 0 and padding_fraction(flat) == 0
    for r, f in zip(rows, flat):
        assert f.input_ids.shape[0] == 1 and r.num_targets == f.num_targets
        assert torch.equal(r.tgt_ids, f.tgt_ids) and torch.equal(r.tgt_seq, f.tgt_seq)
        torch.testing.assert_close(sequence_logprobs(model, f)[0],
                                   plain_sequence_logprobs(model, r)[0], atol=1e-5, rtol=1e-5)
    # pad mode keeps its rows (a 2D padding mask, never flattened)
    pad = layout_sft(docs(6), mode="pad", loss_masking=True, max_length=40)
    b = sft_microbatches(pad, batch_size=3, pad_id=0, seed=0, epoch=0, flat=True)[0]
    assert b.input_ids.shape[0] == 3 and b.attention_mask.dim() == 2


def test_when_segments_apply(monkeypatch):
    model = llama()
    assert A.local_attention(model) == "segments"
    padded = collate_padded(pairs(), 0)
    assert A.attention_for(model, padded.attention_mask) is None   # 2D mask: native kernel
    calls = Calls(monkeypatch)
    sequence_logprobs(model, padded)
    assert calls.n == 0
    model.starpo_segment_attention = False                        # recipe opt-out
    assert A.local_attention(model) is None
    del model.starpo_segment_attention
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert A.local_attention(model) is None           # foreign recompute would cross docs
    model.activation_checkpointing_enable(A.checkpoint_kwargs())
    assert A.local_attention(model) == "segments"     # starpo's context keeps the kernel
    model.activation_checkpointing_disable()
    assert A.local_attention(model) == "segments"
    model.config._attn_implementation = "flash_attention_2"
    assert A.local_attention(model) == "flash"
    assert A.prefix_attention(model) == "flex"        # flash varlen cannot share prefixes
    assert A.attention_for(model, None) is None       # packed docs: flash's own varlen
    assert A.attention_for(model, None, prefix_shared=True) == "flex"
    model.config._attn_implementation = "flex_attention"
    assert A.local_attention(model) == A.prefix_attention(model) == "flex"
    import transformers as T
    g = T.MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                        sliding_window=4)
    gm = T.MistralForCausalLM._from_config(g, attn_implementation="sdpa")
    assert A.local_attention(gm) is None                           # sliding window


def test_context_restores_implementation_and_rejects_misuse():
    model = llama()
    with pytest.raises(RuntimeError):
        with A.segment_attention(model):
            assert model.config._attn_implementation == A.NAME
            raise RuntimeError
    assert model.config._attn_implementation == "sdpa"
    q = torch.zeros(1, 4, 5, 8)
    with pytest.raises(ValueError, match="position_ids"):
        A.segment_sdpa(None, q, q, q, None)
    with pytest.raises(ValueError, match="KV cache"):
        A.segment_sdpa(None, q, q[:, :, :3], q[:, :, :3], None, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="bool"):
        A.segment_sdpa(None, q, q, q, torch.ones(1, 5), position_ids=torch.arange(5)[None])


def test_segments_recipe_option_reaches_the_model(tmp_path):
    from starpo.model import loading
    from starpo.recipe import ModelSpec
    from starpo.world import World
    spec = ModelSpec(tiny={"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2,
                           "intermediate_size": 64}, segment_attention=False)
    model, _ = loading.build_or_load(spec, lambda: World(0).corpus(200), seed=0,
                                      cache_dir=str(tmp_path))
    assert A.local_attention(model) is None
    model2 = loading.load_model(str(next(tmp_path.iterdir())), spec.model_copy(
        update={"segment_attention": True}))
    assert A.local_attention(model2) == "segments"


@pytest.mark.parametrize("kv_heads,attn", [(4, "sdpa"), (2, "sdpa"), (4, "eager")])
def test_prefix_shared_without_a_mask_equals_the_masked_rows(monkeypatch, kv_heads, attn):
    """One row, no [L, L] mask: each pair's branch is read from its positions."""
    model = llama(kv_heads, attn)
    ps = pairs(7, seed=5)
    implicit = collate_prefix_shared(ps, dense_mask=False)
    assert implicit.attention_mask is None and implicit.input_ids.shape[0] == 1
    assert implicit.num_pad == 0 and implicit.meta["implicit_prefix"]
    dense = collate_prefix_shared(ps, max_tokens_per_row=40)       # several rows, a mask
    assert dense.input_ids.shape[0] > 1
    calls = Calls(monkeypatch)
    fast = run(model, sequence_logprobs, implicit)
    assert calls.n == 2
    plain = run(model, plain_sequence_logprobs, dense)
    # per-sequence sums and gradients (per-target order follows the rows, which differ)
    assert_same((fast[0], fast[0], fast[2]), (plain[0], plain[0], plain[2]))


def test_implicit_prefix_batches_are_refused_without_segment_attention():
    model = llama()
    b = collate_prefix_shared(pairs(), dense_mask=False)
    with pytest.raises(ValueError, match="no attention mask"):
        plain_sequence_logprobs(model, b)
    model.starpo_segment_attention = False
    with pytest.raises(ValueError, match="no attention mask"):
        sequence_logprobs(model, b)


def test_segment_plans_read_branches_from_positions():
    pos = torch.tensor([0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 0, 1])   # pair (P=2,C=3,R=2), doc, doc
    assert A._segments(pos) == [(0, 7, 5, 2), (7, 3, None, None), (10, 2, None, None)]
    m = A._branch_mask(7, 5, 2, "cpu")
    assert m[5].tolist() == [True, True, False, False, False, True, False]  # prompt + itself
    assert m[4].tolist() == [True] * 5 + [False, False]                     # chosen: causal
    with pytest.raises(ValueError, match="drops"):
        A._segments(torch.tensor([0, 1, 2, 1, 2, 1]))
    with pytest.raises(ValueError, match="branch"):
        A._segments(torch.tensor([0, 1, 5, 6]))


def test_dpo_stage_uses_one_row_batches_when_attention_allows(tmp_path):
    from starpo.recipe import DPOStage
    from starpo.train.preference import one_row
    st = DPOStage(type="dpo", data={"sources": [{"path": "world:preference"}]})
    model = llama()
    assert one_row(model, st)
    assert one_row(model, st.model_copy(update={"train": st.train.model_copy(
        update={"gradient_checkpointing": True})}))      # the loop's checkpointing keeps it
    model.starpo_segment_attention = False
    assert not one_row(model, st)
    model.config._attn_implementation = "flash_attention_2"
    assert not one_row(model, st)                         # opted out of the flex kernel
    assert one_row(model, st.model_copy(update={"prefix_sharing": False}))   # varlen docs
    del model.starpo_segment_attention
    assert one_row(model, st)                             # prefix-shared rows through flex
