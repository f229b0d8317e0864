"""GPU attention paths (marked ``gpu``: skipped without CUDA; scripts/gpu_check.sh runs
them), each against the sdpa path on the same weights: flash-attention 2 varlen on packed
SFT rows and padding-free preference rows (one row, and several rows that
starpo.model.logprobs flattens), compiled flex attention on mask-free prefix-shared rows
(of a flash model and of a flex_attention model, with and without gradient
checkpointing), and bf16 autocast over fp32 master weights (the loop's mixed precision,
the loader's "auto" dtype). Values and gradients; tolerances are bf16's (8 bits of
mantissa: ~1e-2 relative on sums of a few dozen terms; gradients by relative norm)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from starpo.data.prefbatch import collate_padded, collate_padding_free, collate_prefix_shared
from starpo.model.logprobs import sequence_logprobs

pytestmark = pytest.mark.gpu
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                 reason="flash-attn not installed")


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


@needs_flash
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


def _docs(n=12, seed=0):
    import random
    from starpo.data.tokenize import IGNORE, TokenizedSFT
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(3, 40), rng.randint(1, 80)
        ids = [rng.randrange(3, 200) for _ in range(p + r)]
        out.append(TokenizedSFT(ids, [IGNORE] * p + ids[p:], "t", i))
    return out


def _grads_run(model, batch, **kw):
    """(per-sequence sums, {name: grad}) of one weighted backward."""
    model.zero_grad(set_to_none=True)
    sums = sequence_logprobs(model, batch.to("cuda"), **kw)[0]
    (sums * torch.linspace(0.5, 1.5, sums.numel(), device="cuda")).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sums.detach().float(), grads


def _assert_close_run(a, b, *, rel=3e-2):
    torch.testing.assert_close(a[0], b[0], atol=0.05, rtol=2e-2)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        err = (a[1][k] - b[1][k]).norm() / b[1][k].norm().clamp_min(1e-6)
        assert err < rel, (k, float(err))


def _twin(model, attn, kernel="segments"):
    """A copy of ``model`` with another attention; an sdpa copy runs the per-document
    loop (``kernel``), the reference every fused path is held against."""
    other = _model(attn, next(model.parameters()).dtype)
    other.load_state_dict(model.state_dict())
    other.starpo_packed_attention = kernel
    return other


@needs_flash
@pytest.mark.parametrize("rows", ["one", "several"])
def test_flash_varlen_packed_sft_equals_sdpa_segments(rows):
    """SFT packing: flash varlen on a flat row (or several packed rows, flattened by
    starpo.model.logprobs) equals sdpa segment attention, values and gradients."""
    from starpo.data.packing import layout_sft, sft_microbatches
    from starpo.model import attention as A
    flash = _model("flash_attention_2").train()
    sdpa = _twin(flash, "sdpa").train()
    assert A.local_attention(flash) == "flash" and A.local_attention(sdpa) == "segments"
    lay = layout_sft(_docs(), mode="pack", loss_masking=True, max_length=256)
    b = sft_microbatches(lay, batch_size=4, pad_id=0, seed=0, epoch=0, flat=rows == "one")[0]
    assert (b.input_ids.shape[0] == 1) == (rows == "one")
    _assert_close_run(_grads_run(flash, b), _grads_run(sdpa, b))


@needs_flash
@pytest.mark.parametrize("cap", [None, 64])
def test_flash_varlen_padding_free_pairs_equal_sdpa_segments(cap):
    pairs = _pairs()
    flash = _model("flash_attention_2").train()
    sdpa = _twin(flash, "sdpa").train()
    b = collate_padding_free(pairs, cap)
    _assert_close_run(_grads_run(flash, b), _grads_run(sdpa, b))


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_flex_prefix_shared_rows_equal_sdpa_segments(attn, checkpointing):
    """Mask-free prefix-shared rows on CUDA run torch.compile(flex_attention) with the
    position-derived block mask (no L×L mask anywhere) and equal sdpa segment attention;
    under the loop's gradient checkpointing too."""
    from starpo.model import attention as A
    from starpo.train.loop import _enable_checkpointing
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    pairs = _pairs(24, seed=3)                 # a row of a few thousand tokens: many blocks
    model = _model(attn).train()
    model.starpo_packed_attention = "flex"     # on CUDA a flash model's default is varlen
    sdpa = _twin(model, "sdpa").train()
    b = collate_prefix_shared(pairs, dense_mask=False)
    assert A.attention_for(model, None, prefix_shared=True) == "flex"
    if checkpointing:
        _enable_checkpointing(model)
    _assert_close_run(_grads_run(model, b), _grads_run(sdpa, b))


def test_loop_autocasts_bf16_over_fp32_master_weights(tmp_path):
    """The runtime's "auto" mixed precision is bf16 on this GPU, a trainable model loaded
    with dtype "auto" keeps fp32 weights, and inside the loop's autocast the body computes
    in bf16 while the gradients land on the fp32 weights."""
    from starpo.model import loading
    from starpo.recipe import ModelSpec
    from starpo.runtime import Runtime
    rt = Runtime.create()
    assert rt.device.type == "cuda"
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert rt.mixed_precision("auto") == "bf16"
    model = _model("sdpa", torch.float32)
    model.save_pretrained(tmp_path / "m")
    tok = loading.train_tokenizer(["a b c d e f g"] * 20, 300, 0)   # grows the embeddings
    spec = ModelSpec(name_or_path=str(tmp_path / "m"))
    trained = loading.load_model(str(tmp_path / "m"), spec, for_training=True, device="cuda",
                                 tokenizer=tok)
    inferred = loading.load_model(str(tmp_path / "m"), spec, for_training=False, device="cuda",
                                  tokenizer=tok)
    assert next(trained.parameters()).dtype == torch.float32
    assert next(inferred.parameters()).dtype == torch.bfloat16
    acc = rt.accelerator("auto")
    seen = []
    h = trained.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    b = collate_padded(_pairs(), 0).to("cuda")
    with acc.autocast():
        sums = sequence_logprobs(trained, b)[0]
    sums.sum().backward()
    h.remove()
    assert seen == [torch.bfloat16]
    assert next(trained.parameters()).grad.dtype == torch.float32


needs_varlen = pytest.mark.skipif(importlib.util.find_spec("torch.nn.attention.varlen") is None,
                                  reason="this torch has no torch.nn.attention.varlen")


@needs_varlen
def test_varlen_is_what_sdpa_models_get_on_cuda():
    """The start-up check holds torch's varlen kernel to its specification on this GPU, and
    an sdpa model's packed rows (and prefix-shared pairs) then run it."""
    from starpo.model import attention as A
    assert A.varlen_device(torch.device("cuda"))
    model = _model("sdpa")
    assert A.local_attention(model) == A.prefix_attention(model) == "varlen"
    assert "varlen" in A.describe(model)


@needs_varlen
@pytest.mark.parametrize("layout", ["sft_flat", "sft_rows", "padding_free", "prefix_shared"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_equals_sdpa_segments(layout, checkpointing):
    """torch's varlen kernel (bf16, grouped heads) against the per-document loop on the same
    weights, values and gradients: packed SFT rows (one row, and several rows flattened),
    padding-free pairs, prefix-shared pairs (gathered prompt keys, bottom-right causal)."""
    from starpo.data.packing import layout_sft, sft_microbatches
    from starpo.model import attention as A
    from starpo.train.loop import _enable_checkpointing
    model = _model("sdpa").train()
    ref = _twin(model, "sdpa").train()
    if layout.startswith("sft"):
        lay = layout_sft(_docs(), mode="pack", loss_masking=True, max_length=256)
        b = sft_microbatches(lay, batch_size=4, pad_id=0, seed=0, epoch=0,
                             flat=layout == "sft_flat")[0]
    elif layout == "padding_free":
        b = collate_padding_free(_pairs(), None)
    else:
        b = collate_prefix_shared(_pairs(24, seed=3), dense_mask=False)
    assert A.attention_for(model, b.attention_mask,
                           prefix_shared=layout == "prefix_shared") == "varlen"
    if checkpointing:
        _enable_checkpointing(model)
        _enable_checkpointing(ref)
    _assert_close_run(_grads_run(model, b), _grads_run(ref, b))
