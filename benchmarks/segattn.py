"""Prototype: segment-local attention for packed rows on kernels without varlen support.

Why. On CPU (and with sdpa/eager anywhere) transformers computes attention over the
whole packed row: an ``L × L`` score matrix per head, with a block-diagonal mask that
throws most of it away. For a DPO micro-batch of 8 pairs packed into one row of ~3k
tokens, that quadratic work is more than half of the step (measured with torch.profiler:
``_scaled_dot_product_flash_attention_for_cpu`` forward + backward 58% of a step). The
useful work is only ``Σ segment²``.

What. An attention function registered with transformers' ``AttentionInterface`` under
the name ``starpo_segments``. Segments of a row are found from ``position_ids`` (every
packed document and every prefix-shared segment starts at position 0; a prefix-shared
rejected response continues from the prompt's end, so it stays inside its segment), and
sdpa runs once per segment:

* no mask (padding-free rows / SFT packing): ``is_causal=True`` inside each segment; since
  this implementation has no entry in transformers' mask registry, transformers builds no
  ``L × L`` mask at all;
* a ``[B, 1, L, L]`` bool mask (prefix sharing): the segment's own diagonal block of it.

The result equals the full-row computation (tested in ``tests/test_benchmarks_smoke.py``
to float tolerance). ``segment_sequence_logprobs`` is ``starpo.logprobs.sequence_logprobs``
with the body run under this attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "starpo_segments"


def _segments(pos_row: torch.Tensor) -> list[tuple[int, int]]:
    starts = (pos_row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [pos_row.numel()]
    return list(zip(starts, ends))


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, is_causal=None, position_ids=None, **kwargs):
    """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None).

    Rows and segments are taken apart with ``unbind``/``split`` (whose backward is one
    ``stack``/``cat``), not by slicing: the backward of every slice would allocate and
    zero-fill a full-size gradient (measured: that cost more than the attention saved).
    """
    if position_ids is None:
        raise ValueError(f"{NAME} attention needs position_ids")
    B = query.shape[0]
    pos = position_ids.expand(B, -1) if position_ids.shape[0] != B else position_ids
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, (qb, kb, vb) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        segs = _segments(pos[b])
        lens = [e - s for s, e in segs]
        outs = []
        for (s, e), q, k, v in zip(segs, qb.split(lens, 1), kb.split(lens, 1),
                                   vb.split(lens, 1)):
            # back to 4D: the fused CPU kernel (flash attention for CPU) only takes 4D
            # inputs; 3D ones fall back to the unfused math path (bmm + softmax)
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if attention_mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=e - s > 1, scale=scaling,
                                                   dropout_p=dropout, enable_gqa=gqa)
            else:
                m = attention_mask[b:b + 1, :, s:e, s:e]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling,
                                                   dropout_p=dropout, enable_gqa=gqa)
            outs.append(o[0])
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = torch.stack(rows, 0)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, segment_sdpa)


@contextlib.contextmanager
def segment_attention(model):
    """Run ``model`` (a HF model or its config owner) with segment-local attention."""
    register()
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old


def segment_sequence_logprobs(model, batch, chunk_size: int = 1024):
    """``starpo.logprobs.sequence_logprobs`` with the body under segment-local attention."""
    from starpo.logprobs import _sum_per_sequence, logit_transform, target_logprobs, unwrap_model
    core = unwrap_model(getattr(model, "model", model) if not hasattr(model, "config") else model)
    body = core.get_decoder()
    with segment_attention(core):
        out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    head = core.get_output_embeddings()
    h = hidden[batch.tgt_row.to(hidden.device), batch.tgt_pos.to(hidden.device)]
    scale, softcap = logit_transform(core.config)
    per_target = target_logprobs(h, head, batch.tgt_ids.to(h.device), chunk_size, softcap,
                                 scale=scale)
    sums, counts = _sum_per_sequence(per_target, batch)
    return sums, counts, per_target
