"""GPU attention paths (marked ``gpu``: skipped without CUDA; scripts/gpu_check.sh runs
them). flash-attention 2 varlen on padding-free preference rows and on a packed row gives
the padded batch's log-probs; bf16 autocast over fp32 master weights stays close to fp32.
Tolerances are bf16's (8 bits of mantissa: ~1e-2 relative on sums of a few dozen terms)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from starpo.data.prefbatch import collate_padded, collate_padding_free
from starpo.model.logprobs import sequence_logprobs

pytestmark = pytest.mark.gpu


def _pairs(n=6, seed=0):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(3, 200) for _ in range(rng.randint(3, 30))]
        c = [rng.randrange(3, 200) for _ in range(rng.randint(1, 40))]
        r = [rng.randrange(3, 200) for _ in range(rng.randint(1, 40))]
        out.append({"prompt_ids": p, "chosen_ids": c, "chosen_labels": c,
                    "rejected_ids": r, "rejected_labels": r})
    return out


def _model(attn: str, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn,
                                         torch_dtype=dtype).cuda().eval()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                    reason="flash-attn not installed")
def test_flash_attention_varlen_padding_free_equals_padded():
    pairs = _pairs()
    flash, sdpa = _model("flash_attention_2"), _model("sdpa")
    sdpa.load_state_dict(flash.state_dict())
    with torch.no_grad():
        packed = sequence_logprobs(flash, collate_padding_free(pairs, None).to("cuda"))[0]
        padded = sequence_logprobs(sdpa, collate_padded(pairs, 0).to("cuda"))[0]
    torch.testing.assert_close(packed.float(), padded.float(), atol=0.05, rtol=2e-2)


def test_bf16_autocast_with_fp32_master_weights_is_close_to_fp32():
    from accelerate import Accelerator
    pairs = _pairs()
    model = _model("sdpa", torch.float32)
    batch = collate_padded(pairs, 0).to("cuda")
    with torch.no_grad():
        ref = sequence_logprobs(model, batch)[0]
        with Accelerator(mixed_precision="bf16").autocast():
            mixed = sequence_logprobs(model, batch)[0]
    assert next(model.parameters()).dtype == torch.float32      # master weights stay fp32
    torch.testing.assert_close(mixed.float(), ref.float(), atol=0.1, rtol=2e-2)
