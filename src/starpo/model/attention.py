"""Segment-local attention for packed rows on kernels without variable-length support.

Why. With sdpa or eager attention (CPU, and GPUs without flash-attention) transformers
computes attention over the whole packed row: an ``L × L`` score matrix per head, with a
block-diagonal mask that throws most of it away. The useful work is only ``Σ segment²``.
Measured on this project's CPU (torch.profiler, 8 DPO pairs in one ~3k-token row): the
attention kernel's forward + backward was 58% of a step; running it per segment made DPO
steps 1.47× and SFT steps 1.3× faster (``BENCHMARKS.md``). It also lets a whole SFT
micro-batch be one row with no padding at all (:func:`starpo.data.packing.collate_rows`
with ``flat=True``), which over whole rows would cost ``(B·L)²`` attention.

What. An attention function registered with transformers' ``AttentionInterface`` as
``starpo_segments``. A row's segments are read from ``position_ids``: every packed document
and every prefix-shared pair starts at position 0 (a prefix-shared rejected response
continues from its prompt's end, so it stays inside its pair's segment). sdpa then runs
once per segment:

* no mask (packed / padding-free rows): ``is_causal=True`` inside each segment. Because this
  implementation has no entry in transformers' mask registry, transformers builds no
  ``L × L`` mask at all;
* a ``[B, 1, L, L]`` bool mask (prefix sharing, True = attend): each segment uses its own
  diagonal block of it;
* no mask on prefix-shared rows built without one (``collate_prefix_shared(...,
  dense_mask=False)``): the pair's layout is read from its positions — prompt ``0..P-1``,
  chosen ``P..``, then a drop back to ``P`` where the rejected response starts — and the
  segment gets its own small mask: causal, rejected rows blind to the chosen columns. So a
  whole micro-batch of pairs can be one row with no ``L × L`` mask anywhere.

The result equals transformers' whole-row computation to float tolerance (tests/
test_attention.py, values and gradients, for SFT packing, padding-free and prefix-shared
preference rows).

When it applies (:func:`segments_apply`): the model runs sdpa or eager attention, the batch
has no 2D padding mask, the model has no sliding window and no attention-logit softcapping
(which this function does not implement), gradient checkpointing is off (its recomputation
runs outside :func:`segment_attention` and would fall back to whole-row causal attention),
and ``model.starpo_segment_attention`` is not False (``model.segment_attention: false`` in a
recipe). flash-attention kernels need none of this: they read packed documents from
``position_ids`` themselves (varlen).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

NAME = "starpo_segments"
_registered = False


def _segments(pos_row: torch.Tensor) -> list[tuple[int, int, int | None, int | None]]:
    """The segments of one row as ``(start, length, branch, prompt_len)``: a segment starts
    wherever position_ids is 0; ``branch`` is the offset (in the segment) where positions
    drop back to ``prompt_len`` (a prefix-shared pair's rejected response), else None."""
    n = pos_row.numel()
    starts = (pos_row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [n]
    # a drop: a position that neither continues the previous one nor starts a segment
    jumps = ((pos_row[1:] != pos_row[:-1] + 1) & (pos_row[1:] != 0)).nonzero().flatten()
    jumps = (jumps + 1).tolist()
    out, k = [], 0
    for s, e in zip(starts, ends):
        inside = []
        while k < len(jumps) and jumps[k] < e:
            if jumps[k] > s:
                inside.append(jumps[k])
            k += 1
        if len(inside) > 1:
            raise ValueError(f"{NAME} attention: a segment with {len(inside)} position drops "
                             "(only one branch per segment, a prefix-shared pair, is supported)")
        if inside:
            b = inside[0]
            q = int(pos_row[b])
            if not 0 < q <= b - s - 1:
                raise ValueError(f"{NAME} attention: a branch at position {q} does not "
                                 "continue a prompt of its segment")
            out.append((s, e - s, b - s, q))
        else:
            out.append((s, e - s, None, None))
    return out


# the segments of the position_ids tensor of the current forward: every layer gets the
# same tensor object, so they are read once. The entry holds that tensor itself (identity,
# not an address that a later tensor could reuse) and is dropped when the forward ends.
_plans: dict = {}


def _row_plans(position_ids: torch.Tensor, rows: int) -> list:
    if _plans.get("ids") is not position_ids:
        pos = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
        _plans.clear()
        _plans.update(ids=position_ids, plan=[_segments(row) for row in pos.cpu()])
    return _plans["plan"]


def _branch_mask(n: int, branch: int, prompt_len: int, device) -> torch.Tensor:
    """``[n, n]`` bool, True = attend: causal, except that rejected rows (from ``branch``)
    do not see the chosen columns ``prompt_len..branch-1``."""
    m = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    m[branch:, prompt_len:branch] = False
    return m


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, is_causal=None, position_ids=None, **kwargs):
    """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None).

    Rows and segments are taken apart with ``unbind``/``split`` (whose backward is one
    ``stack``/``cat``) rather than by slicing: the backward of every slice allocates and
    zero-fills a full-size gradient, which measured slower than the attention it saved.
    """
    if position_ids is None:
        raise ValueError(f"{NAME} attention needs position_ids")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError(f"{NAME} attention does not implement sliding windows or softcapping")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{NAME} attention is for training forwards (no KV cache)")
    B = query.shape[0]
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is not None and (attention_mask.dim() != 4 or
                                       attention_mask.dtype != torch.bool):
        raise ValueError(f"{NAME} attention takes no mask or a bool [B, 1, L, L] mask")
    rows = []
    plans = _row_plans(position_ids, B)
    for b, (qb, kb, vb) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        segs = plans[b]
        lens = [n for _, n, _, _ in segs]
        outs = []
        for (s, n, branch, plen), q, k, v in zip(segs, qb.split(lens, 1), kb.split(lens, 1),
                                                 vb.split(lens, 1)):
            # 4D inputs: only those reach the fused CPU kernel; 3D ones take the slower
            # unfused math path (bmm + softmax)
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if attention_mask is not None:
                m = attention_mask[b:b + 1, :, s:s + n, s:s + n]
            elif branch is not None:
                m = _branch_mask(n, branch, plen, q.device)
            else:
                m = None            # a plain document: causal, no mask to build
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                               is_causal=m is None and n > 1, scale=scaling,
                                               dropout_p=dropout, enable_gqa=gqa)
            outs.append(o[0])
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = torch.stack(rows, 0)
    return out.transpose(1, 2).contiguous(), None


def _dispatch(*args, **kwargs):
    # looked up at call time, so a wrapped ``segment_sdpa`` (tests count calls) is used
    return segment_sdpa(*args, **kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(NAME, _dispatch)
        _registered = True


def _configs(core: nn.Module) -> list:
    cfg = core.config
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else cfg
    return [cfg] if text is cfg else [cfg, text]


def local_attention(core: nn.Module) -> str | None:
    """How ``core`` (an unwrapped HF model) keeps packed documents apart at a cost of
    ``Σ segment²``: ``"flash"`` (its own varlen kernel), ``"segments"`` (this module) or
    None (whole-row attention with a block mask: keep rows short)."""
    cfgs = _configs(core)
    impl = str(getattr(cfgs[-1], "_attn_implementation", None) or "")
    if "flash" in impl:
        return "flash"
    if impl not in ("sdpa", "eager") or getattr(core, "starpo_segment_attention", True) is False:
        return None
    if any(getattr(m, "gradient_checkpointing", False) is True for m in core.modules()):
        return None
    for c in cfgs:
        if getattr(c, "sliding_window", None) is not None or \
                getattr(c, "attn_logit_softcapping", None) is not None:
            return None
    return "segments"


def segments_apply(core: nn.Module, attention_mask) -> bool:
    """Whether a training forward of ``core`` on a batch with this mask runs per segment."""
    if attention_mask is not None and (attention_mask.dim() != 4 or
                                       attention_mask.dtype != torch.bool):
        return False
    return local_attention(core) == "segments"


@contextlib.contextmanager
def segment_attention(core: nn.Module):
    """Run ``core`` (an unwrapped HF model) with segment-local attention inside the block.

    The attention layers read ``config._attn_implementation`` at every call, so switching
    it for the duration of one forward is enough; generation (KV cache) never sees it.
    """
    register()
    cfgs = _configs(core)
    old = [c._attn_implementation for c in cfgs]
    _plans.clear()
    try:
        for c in cfgs:
            c._attn_implementation = NAME
        yield
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o
        _plans.clear()


def one_row_batches(core: nn.Module, *, prefix_shared: bool, checkpointing: bool = False
                    ) -> bool:
    """Whether a micro-batch of packed documents (or of prefix-shared pairs) can be ONE row
    of any length — no row cap, no padding — for ``core``: its attention costs ``Σ
    segment²`` whatever the row length (segment attention; for documents without shared
    prompts also flash-attention varlen), and for prefix-shared pairs segment attention
    reads each pair's layout from its positions, so no ``L × L`` mask is built. Not under
    gradient checkpointing (see :func:`local_attention`)."""
    if checkpointing:
        return False
    kind = local_attention(core)
    return kind == "segments" if prefix_shared else kind in ("segments", "flash")

