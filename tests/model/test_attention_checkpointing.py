"""starpo's attention kernels under gradient checkpointing: the loop's checkpointing
(non-reentrant, ``checkpoint_context``) recomputes each layer with the same kernel and
segment metadata, so loss and gradients equal those without checkpointing — for packed SFT
rows and mask-free prefix-shared pairs, through segment attention and through flex
attention (CPU guard lifted as in test_flex_attention.py)."""

from __future__ import annotations

import pytest

from starpo.data.packing import layout_sft, sft_microbatches
from starpo.data.prefbatch import collate_prefix_shared
from starpo.model import attention as A
from starpo.model.logprobs import sequence_logprobs
from starpo.train.loop import _enable_checkpointing
from attention_cases import FlexCalls, assert_same, docs, lift_cpu_guard, llama, pairs, run

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def batch(layout: str):
    if layout == "sft_flat":
        lay = layout_sft(docs(12), mode="pack", loss_masking=True, max_length=40)
        return sft_microbatches(lay, batch_size=4, pad_id=0, seed=0, epoch=0, flat=True)[0]
    return collate_prefix_shared(pairs(7, seed=5), dense_mask=False)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "flash_attention_2"])
@pytest.mark.parametrize("layout", ["sft_flat", "prefix_shared"])
def test_checkpointing_keeps_loss_and_gradients(monkeypatch, layout, attn):
    if attn == "flash_attention_2" and layout == "sft_flat":
        pytest.skip("packed documents of a flash model run flash itself (GPU test)")
    lift_cpu_guard(monkeypatch)
    model = llama(2, "sdpa" if attn == "flash_attention_2" else attn).train()
    if attn == "flash_attention_2":
        model.config._attn_implementation = attn       # only its prefix rows run (flex)
    b = batch(layout)
    kind = A.attention_for(model, b.attention_mask, prefix_shared=layout == "prefix_shared")
    assert kind == ("segments" if attn == "sdpa" else "flex")
    calls = FlexCalls(monkeypatch)
    plain = run(model, sequence_logprobs, b)
    n_plain = calls.flex + calls.seg
    assert n_plain == 2                                  # one call per layer
    _enable_checkpointing(model)                        # what run_loop does
    assert all(m.gradient_checkpointing for m in model.model.layers)
    assert A.attention_for(model, b.attention_mask,
                           prefix_shared=layout == "prefix_shared") == kind
    ckpt = run(model, sequence_logprobs, b)
    assert calls.flex + calls.seg == 3 * n_plain        # forward + recomputation in backward
    assert (calls.flex if kind == "flex" else calls.seg) == 3 * n_plain
    assert model.config._attn_implementation == attn   # restored after backward
    assert A._state == {} and A._active == []
    assert_same(ckpt, plain)


def test_foreign_checkpointing_still_steps_aside():
    """Checkpointing enabled without starpo's context: the recomputation would run the
    model's own kernel across documents, so no starpo kernel (and one-row batches are off)."""
    model = llama().train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert A.local_attention(model) is None
    assert not A.one_row_batches(model, prefix_shared=True)
    with pytest.raises(ValueError, match="no attention mask"):
        sequence_logprobs(model, batch("prefix_shared"))
