"""Attention for packed training rows: documents (and prefix-shared pairs) kept apart at a
cost of ``Σ segment²``, never with an ``L × L`` mask.

Why. With sdpa or eager attention (CPU, and GPUs without flash-attention) transformers
computes attention over the whole packed row: an ``L × L`` score matrix per head, with a
block-diagonal mask that throws most of it away. The useful work is only ``Σ segment²``
(on a CPU, whole-row attention was over half of a DPO step; BENCHMARKS.md has the
figures). It also lets a whole SFT
micro-batch be one row with no padding at all (:func:`starpo.data.packing.collate_rows`
with ``flat=True``), which over whole rows would cost ``(B·L)²`` attention.

The layout of a row is read from ``position_ids`` alone (:func:`_segments`): every packed
document and every prefix-shared pair starts at position 0; a prefix-shared pair is
prompt ``0..P-1``, chosen ``P..``, then a drop back to ``P`` where the rejected response
starts (it stays inside its pair's segment and must not see the chosen tokens).

Kernels (:func:`local_attention` says which one a model gets, :func:`attention_for` which
one a given training forward runs, :func:`describe` the line each training stage logs;
``model.packed_attention`` in a recipe forces one where the device offers it):

``"segments"`` — sdpa or eager models on a CPU (the default there, where it is the
  fastest). An attention function registered with transformers' ``AttentionInterface`` as
  ``starpo_segments`` runs sdpa once per segment:
  ``is_causal=True`` inside a plain document (no mask built at all: this implementation
  has no entry in transformers' mask registry); a segment's own diagonal block of a
  ``[B, 1, L, L]`` bool mask when the batch has one; for a prefix-shared pair without a
  mask, a small ``segment × segment`` mask of its own (causal, rejected rows blind to the
  chosen columns).

``"varlen"`` — sdpa/eager models on CUDA (the default there), and the prefix-shared rows
  of flash-attention models: ``torch.nn.attention.varlen.varlen_attn`` (flash attention's
  variable-length kernel inside PyTorch; no flash-attn package needed) runs every document
  of every row of a micro-batch in ONE call per layer (:func:`varlen_sdpa`), the rows
  flattened to ``[B·L]`` and the documents given as cumulative lengths. A prefix-shared
  pair is two sequences: ``prompt · chosen`` (square, causal) and ``rejected`` over the
  keys ``prompt · rejected`` gathered side by side, causal aligned to the bottom right
  (:func:`varlen_layout`). That alignment is flash attention's definition; a start-up
  check per device (:func:`_varlen_probe`) holds torch's kernel to it before any model
  uses it. The fused kernel takes fp16/bf16 (the loop's bf16 autocast on a GPU); fp32
  inputs run the flex kernel instead. The per-document loop launched ~10 small kernels
  per document and layer, which on a GPU cost more than the attention itself.

``"flex"`` — models loaded with ``attn_implementation: flex_attention``, and the
  prefix-shared rows of flash-attention models (flash varlen cannot express "rejected sees
  the prompt but not the chosen tokens"). ``starpo_block_sparse`` calls
  ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from per-token segment
  ids and sides (prompt/document 0, chosen 1, rejected 2): the mask function is
  ``same segment ∧ causal ∧ ¬(rejected query ∧ chosen key)``, and which ``128 × 128``
  blocks are empty, partial or full is decided from per-block min/max segment ids
  (:func:`block_mask`, ``O((L/128)²)`` work) instead of evaluating the mask function on an
  ``L × L`` grid as ``create_block_mask`` does in eager mode. On CUDA the kernel is
  ``torch.compile(flex_attention, dynamic=True)`` (fused; the scores are never
  materialised). Compiled with static shapes it compiled three times for rows of six
  random lengths (static, then automatic-dynamic, then once more) where ``dynamic=True``
  compiles twice (inductor on this CPU, forward only) — rows change length every step, so
  early steps pay those compilations. On CPU torch 2.13 offers flex attention only without
  gradients (``NotImplementedError: FlexAttention does not support backward on CPU``) and
  uncompiled it materialises the ``[B, H, L, L]`` scores (compiled through inductor it is
  fused, but the first call compiles for ~20 s here); so on CPU a forward without
  gradients (reference pass, evaluation) runs flex attention uncompiled and a forward
  with gradients runs ``"segments"`` instead — the same function, computed per segment.
  Not with dropout, sliding windows or logit softcapping (not implemented here).

``"flash"`` — flash-attention models: transformers' own varlen kernel reads packed
  documents from ``position_ids`` (``cu_seqlens``), but only for a batch of ONE row
  (``_is_packed_sequence`` in ``modeling_flash_attention_utils``); :mod:`starpo.model.logprobs`
  therefore flattens a multi-row packed batch into one row before the body runs.

Gradient checkpointing. The recomputation of a checkpointed layer runs in backward,
after the forward's :func:`segment_attention` block has restored the model's own kernel,
and would silently compute whole-row causal attention across documents.
:func:`checkpoint_kwargs` (what ``starpo.train.loop`` enables checkpointing with:
non-reentrant, plus :func:`checkpoint_context` as torch's ``context_fn``) captures the
kernel and the segment metadata of the forward and reinstates both around each layer's
recomputation. A model checkpointed any other way gets no segment kernel
(:func:`local_attention` returns None for it).

When a kernel applies: the model runs sdpa/eager (segments or varlen), flex_attention
(flex) or flash-attention; the batch has no 2D padding mask (a 4D bool mask only for segments); the
model has no sliding window and no attention-logit softcapping; and
``model.starpo_segment_attention`` is not False (``model.segment_attention: false`` in a
recipe). The results equal transformers' whole-row computation to float tolerance
(tests/model/test_attention.py, test_flex_attention.py, test_varlen_attention.py, values
and gradients; tests/model/test_gpu_attention.py on CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NAME = "starpo_segments"
# no "flex"/"flash"/"sdpa" inside the names: transformers picks mask builders by substring
FLEX_NAME = "starpo_block_sparse"
VARLEN_NAME = "starpo_varlen"
KERNELS = {"segments": NAME, "flex": FLEX_NAME, "varlen": VARLEN_NAME}
BLOCK = 128
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


# What the current forward's kernels share: the position_ids tensor it was built for (every
# layer gets the same object, so rows are parsed once; identity, not an address that a
# later tensor could reuse), its segment plans and its block masks. A new dict per
# forward: checkpoint_context keeps a reference to the one of its forward.
_state: dict = {}
# (configs, kernel name) while a segment_attention block is active
_active: list = []


def _row_plans(position_ids: torch.Tensor, rows: int) -> list:
    st = _state
    if st.get("ids") is not position_ids:
        pos = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
        st.clear()
        st.update(ids=position_ids, plan=[_segments(row) for row in pos.cpu()])
    return st["plan"]


def _branch_mask(n: int, branch: int, prompt_len: int, device) -> torch.Tensor:
    """``[n, n]`` bool, True = attend: causal, except that rejected rows (from ``branch``)
    do not see the chosen columns ``prompt_len..branch-1``."""
    m = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    m[branch:, prompt_len:branch] = False
    return m


def _check_call(name: str, query, key, attention_mask, position_ids, kwargs, *,
                takes_mask: bool = False) -> None:
    """What every starpo kernel requires of a call: position ids to read the layout from,
    no sliding window or softcapping, no KV cache (training forwards), and no attention
    mask for the kernels that read everything from the positions."""
    if position_ids is None:
        raise ValueError(f"{name} attention needs position_ids")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError(f"{name} attention does not implement sliding windows or "
                         "softcapping")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{name} attention is for training forwards (no KV cache)")
    if attention_mask is not None and not takes_mask:
        raise ValueError(f"{name} attention reads the layout from position_ids; it takes "
                         "no attention mask")


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, is_causal=None, position_ids=None, **kwargs):
    """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None).

    Rows and segments are taken apart with ``unbind``/``split`` (whose backward is one
    ``stack``/``cat``) rather than by slicing: the backward of every slice allocates and
    zero-fills a full-size gradient, which measured slower than the attention it saved.
    """
    _check_call(NAME, query, key, attention_mask, position_ids, kwargs, takes_mask=True)
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


# ---------------------------------------------------------------------------------------
# flex attention with a block mask read from positions
# ---------------------------------------------------------------------------------------


def token_layout(plans: list, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(segment id, side)`` ``[B, length]`` int32 of rows parsed by
    :func:`_segments`; side 0 = prompt or plain document, 1 = chosen, 2 = rejected."""
    seg = torch.zeros(len(plans), length, dtype=torch.int32)
    side = torch.zeros(len(plans), length, dtype=torch.int32)
    for b, segs in enumerate(plans):
        for i, (s, n, branch, plen) in enumerate(segs):
            seg[b, s:s + n] = i
            if branch is not None:
                side[b, s + plen:s + branch] = 1
                side[b, s + branch:s + n] = 2
    return seg.to(device), side.to(device)


def mask_fn(seg: torch.Tensor, side: torch.Tensor):
    """flex attention's ``mask_mod``: same segment, causal, rejected queries blind to
    chosen keys. ``seg``/``side`` must cover every index the kernel may ask for."""
    def mask_mod(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv) & ~((side[b, q] == 2) & (side[b, kv] == 1))
    return mask_mod


def _ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block matrix ``[B, nq, nkv]`` bool -> (count ``[B, 1, nq]``, indices ``[B, 1, nq, nkv]``),
    the listed blocks first (what ``BlockMask.from_kv_blocks`` takes)."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None], idx[:, None]


def block_mask(seg: torch.Tensor, side: torch.Tensor, block: int = BLOCK):
    """The ``BlockMask`` of :func:`mask_fn` for ``[B, L]`` segment ids and sides, without
    an ``L × L`` grid.

    Segments are contiguous, so per-block min/max segment ids say everything needed: a
    (query block i, key block j) pair can hold an allowed entry only if ``j ≤ i`` and their
    segment ranges meet; it is FULL (no mask evaluated) only if ``j < i``, both blocks lie
    in one and the same segment and not (query block has rejected ∧ key block has
    chosen). Anything else that may hold an entry is PARTIAL (the kernel applies
    ``mask_mod``); a partial block that turns out empty costs time, never correctness.
    """
    from torch.nn.attention.flex_attention import BlockMask
    B, L = seg.shape
    nb = -(-L // block)
    pad = nb * block - L
    # the tail of the last block: a segment of its own, so no block containing it is full
    segp = F.pad(seg, (0, pad), value=int(seg.max()) + 1 if seg.numel() else 0)
    sidep = F.pad(side, (0, pad), value=0)
    sb, db = segp.view(B, nb, block), sidep.view(B, nb, block)
    lo, hi = sb.amin(-1), sb.amax(-1)                                  # [B, nb]
    has_ch, has_rj = (db == 1).any(-1), (db == 2).any(-1)
    all_ch, all_rj = (db == 1).all(-1), (db == 2).all(-1)
    i = torch.arange(nb, device=seg.device)
    causal = (i[None, :] <= i[:, None])[None]                          # [1, nq, nkv]
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    single = lo == hi
    one_seg = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    blind = one_seg & all_rj[:, :, None] & all_ch[:, None, :]         # rejected × chosen only
    live = causal & meet & ~blind
    full = live & (i[None, :] < i[:, None])[None] & one_seg & \
        ~(has_rj[:, :, None] & has_ch[:, None, :])
    partial = live & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block,
                                    mask_mod=mask_fn(segp, sidep), seq_lengths=(L, L))


def _flex_has_backward(device: torch.device) -> bool:
    """Whether torch's flex attention has a backward on ``device`` (torch 2.13: not on CPU
    or MPS)."""
    return device.type not in ("cpu", "mps")


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _flex_kernel(device: torch.device):
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


def _row_block_mask(position_ids: torch.Tensor, rows: int, length: int, device):
    plans = _row_plans(position_ids, rows)
    st = _state
    if st.get("block_mask") is None:
        seg, side = token_layout(plans, length, device)
        st["block_mask"] = block_mask(seg, side, BLOCK)
    return st["block_mask"]


def flex_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, is_causal=None, position_ids=None, **kwargs):
    """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None),
    through flex attention with the rows' block mask (see the module docstring; on CPU
    with gradients it is :func:`segment_sdpa`)."""
    _check_call(FLEX_NAME, query, key, attention_mask, position_ids, kwargs)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if grad and not _flex_has_backward(query.device):
        return segment_sdpa(module, query, key, value, None, dropout, scaling,
                            position_ids=position_ids)
    if dropout:
        raise ValueError(f"{FLEX_NAME} attention does not implement attention dropout")
    B, _, L, _ = query.shape
    bm = _row_block_mask(position_ids, B, L, query.device)
    out = _flex_kernel(query.device)(query, key, value, block_mask=bm, scale=scaling,
                                     enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------
# varlen: torch's flash-attention varlen kernel, one call per layer (CUDA)
# ---------------------------------------------------------------------------------------


class VarlenLayout(NamedTuple):
    """What one varlen call needs for ``B`` rows of ``L`` tokens flattened to ``[B·L]``.

    ``cu_q``/``cu_k`` ``[N+1]`` int32: boundaries of the ``N`` query sequences in the
    flattened queries and of their key sequences in the (gathered) keys; ``max_q``/``max_k``
    their longest lengths; ``k_index`` ``[T_k]`` long: which flattened key each gathered key
    is (None when keys are the queries' own tokens, i.e. no prefix-shared pair)."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    k_index: torch.Tensor | None


def varlen_layout(plans: list, length: int, device=None) -> VarlenLayout:
    """The :class:`VarlenLayout` of rows parsed by :func:`_segments`.

    A plain document is one sequence whose keys are its own tokens (square, causal). A
    prefix-shared pair ``prompt · chosen · rejected`` is two sequences: queries ``prompt ·
    chosen`` over the same keys (square, causal), and queries ``rejected`` over the keys
    ``prompt · rejected`` gathered side by side, causal aligned to the bottom right (the
    first rejected token sees the whole prompt and itself): rejected tokens never see the
    chosen ones and the queries stay in row order, so only keys and values are gathered.
    """
    cu_q, cu_k, max_q, max_k, keys, branched = [0], [0], 0, 0, [], False
    for b, segs in enumerate(plans):
        o = b * length
        for s, n, branch, plen in segs:
            if branch is None:
                pieces = [(n, [(o + s, n)])]
            else:
                branched = True
                pieces = [(branch, [(o + s, branch)]),
                          (n - branch, [(o + s, plen), (o + s + branch, n - branch)])]
            for qn, spans in pieces:
                kn = sum(m for _, m in spans)
                cu_q.append(cu_q[-1] + qn)
                cu_k.append(cu_k[-1] + kn)
                max_q, max_k = max(max_q, qn), max(max_k, kn)
                keys.extend(spans)
    index = None
    if branched:
        index = torch.cat([torch.arange(a, a + m) for a, m in keys]).to(device)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return VarlenLayout(as_i32(cu_q), as_i32(cu_k), max_q, max_k, index)


def varlen_dense(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, gqa=False):
    """The varlen kernel's meaning spelled out densely (one sdpa call, a ``[T_q, T_k]``
    mask): query ``i`` of sequence ``s`` sees key ``j`` of the same sequence iff
    ``j ≤ i + (len_k(s) − len_q(s))`` (causal aligned to the bottom right, as flash
    attention defines it). ``q`` ``[T_q, H, D]``, ``k``/``v`` ``[T_k, Hkv, D]`` ->
    ``[T_q, H, D]``.

    It is what :func:`_varlen_probe` holds torch's kernel against on a GPU, and the CPU
    stand-in for that kernel in the tests: there it proves the layout (sequence boundaries,
    gathered keys, row order of the output), the dispatch and the call count; it does not
    prove the fused kernel's arithmetic, which the probe and the ``gpu`` tests do."""
    tq, tk = q.shape[0], k.shape[0]
    cq, ck = cu_q.long().cpu(), cu_k.long().cpu()
    sq = torch.searchsorted(cq, torch.arange(tq), right=True) - 1       # sequence of a query
    sk = torch.searchsorted(ck, torch.arange(tk), right=True) - 1
    iq = torch.arange(tq) - cq[sq]                                       # index in sequence
    ik = torch.arange(tk) - ck[sk]
    shift = (ck[1:] - ck[:-1]) - (cq[1:] - cq[:-1])                      # len_k − len_q
    mask = (sq[:, None] == sk[None, :]) & (ik[None, :] <= iq[:, None] + shift[sq][:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask.to(q.device),
                                         scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _varlen_signature() -> frozenset:
    import inspect
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, gqa=False):
    """``torch.nn.attention.varlen.varlen_attn``, causal, across the torch releases that
    have it: 2.9/2.10 take ``is_causal``, later ones ``window_size=(-1, 0)``; releases
    without ``enable_gqa`` get the key/value heads repeated; ``scale`` is passed where
    the signature has it (else the kernel's default ``1/√D``, which :func:`_varlen_kernel`
    requires). Same arguments and result as :func:`varlen_dense`."""
    from torch.nn.attention.varlen import varlen_attn
    params = _varlen_signature()
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    if gqa:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _varlen_importable() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_device(device: torch.device) -> bool:
    """Whether the varlen kernel can serve a model on ``device``: CUDA with a torch that
    has ``torch.nn.attention.varlen`` and a kernel that passes :func:`_varlen_probe`."""
    device = torch.device(device)
    return device.type == "cuda" and _varlen_importable() and _varlen_probe(device)


@functools.lru_cache(maxsize=None)
def _varlen_probe(device: torch.device) -> bool:
    """Hold torch's varlen kernel against :func:`varlen_dense` once per device, in bf16,
    on a case that needs both a square and a bottom-right-aligned sequence with grouped
    heads: the output (largest difference ≤ 3e-2) and the gradients of query, key and value
    (relative norm ≤ 3e-2; training runs the backward kernel, a separate one). A torch whose
    kernel means something else (or fails) is not used, with a warning saying why, and the
    flex kernel runs instead."""
    import warnings
    # the first packed forward may be a reference pass or an evaluation (no_grad,
    # inference mode, autocast): the check needs gradients and its own dtypes
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        try:
            got, want = _varlen_probe_values(device)
        except Exception as err:        # any failure means: do not use it
            warnings.warn(f"starpo: torch's varlen attention failed its check on {device} "
                          f"({type(err).__name__}: {err}); packed rows use flex attention")
            return False
    err = float((got[0] - want[0]).abs().max())
    if err > 3e-2:
        warnings.warn(f"starpo: torch's varlen attention differs from its specification by "
                      f"{err:.3g} on {device} (causal alignment?); packed rows use flex "
                      "attention")
        return False
    for name, a, b in zip(("query", "key", "value"), got[1:], want[1:]):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if rel > 3e-2:
            warnings.warn(f"starpo: the gradient of torch's varlen attention with respect "
                          f"to the {name} differs from its specification (relative error "
                          f"{rel:.3g}) on {device}; packed rows use flex attention")
            return False
    return True


def _varlen_probe_values(device: torch.device) -> tuple[list, list]:
    """(torch's kernel in bf16, the dense specification in fp32): each ``[output, dq, dk,
    dv]`` as float32, for :func:`_varlen_probe`'s case."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lens_q, lens_k = [5, 3, 4], [5, 7, 4]
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, 4, 64, generator=g).to(device, torch.bfloat16)
    k = torch.randn(tk, 2, 64, generator=g).to(device, torch.bfloat16)
    v = torch.randn(tk, 2, 64, generator=g).to(device, torch.bfloat16)
    grad_out = torch.randn(tq, 4, 64, generator=g).to(device, torch.bfloat16)
    cum = lambda x: torch.tensor([0] + list(itertools.accumulate(x)), dtype=torch.int32,
                                 device=device)
    args = (cum(lens_q), cum(lens_k), max(lens_q), max(lens_k))

    def run(fn, dtype):
        x = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*x, *args, gqa=True)
        out.backward(grad_out.to(dtype))
        return [out.detach().float()] + [(torch.zeros_like(t) if t.grad is None else t.grad)
                                         .float() for t in x]
    return run(torch_varlen, torch.bfloat16), run(varlen_dense, torch.float32)


def _varlen_kernel(query: torch.Tensor, scaling, dropout: float):
    """The varlen function for these inputs, or None when the fused kernel cannot take them
    (not CUDA, not fp16/bf16 — e.g. fp32 without autocast —, head dim over 256, attention
    dropout, or a scale the torch release cannot pass)."""
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    if dropout or query.shape[-1] > 256:
        return None
    if scaling is not None and "scale" not in _varlen_signature() and \
            abs(scaling * query.shape[-1] ** 0.5 - 1) > 1e-6:
        return None
    return torch_varlen


def _row_varlen_layout(position_ids: torch.Tensor, rows: int, length: int, device):
    plans = _row_plans(position_ids, rows)
    st = _state
    if st.get("varlen") is None:
        st["varlen"] = varlen_layout(plans, length, device)
    return st["varlen"]


_fallback_warned: set = set()


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, is_causal=None, position_ids=None, **kwargs):
    """query ``[B, H, L, D]``, key/value ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None):
    every packed document and prefix-shared pair of every row in ONE varlen call (see
    :func:`varlen_layout`); nothing is looped over in Python but the row plans, once per
    forward. Inputs the fused kernel cannot take (see :func:`_varlen_kernel`) run the flex
    kernel instead, with a warning once per reason."""
    _check_call(VARLEN_NAME, query, key, attention_mask, position_ids, kwargs)
    kernel = _varlen_kernel(query, scaling, dropout)
    if kernel is None:
        why = f"{query.device.type}/{query.dtype}/dropout={dropout}"
        if why not in _fallback_warned:
            import warnings
            _fallback_warned.add(why)
            warnings.warn(f"starpo: varlen attention cannot take these inputs ({why}); "
                          "packed rows run the flex kernel")
        return flex_sdpa(module, query, key, value, None, dropout, scaling,
                         position_ids=position_ids)
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    lay = _row_varlen_layout(position_ids, B, L, query.device)
    # [B, H, L, D] is a transposed view of the projections' [B, L, H, D]: no copy here
    q = query.transpose(1, 2).reshape(B * L, H, D)
    k = key.transpose(1, 2).reshape(B * L, Hkv, D)
    v = value.transpose(1, 2).reshape(B * L, Hkv, D)
    if lay.k_index is not None:
        k, v = k.index_select(0, lay.k_index), v.index_select(0, lay.k_index)
    out = kernel(q, k, v, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, scale=scaling,
                 gqa=Hkv != H)
    return out.view(B, L, H, D), None


# ---------------------------------------------------------------------------------------
# selection, the switch, checkpointing
# ---------------------------------------------------------------------------------------


def _dispatch(*args, **kwargs):
    # looked up at call time, so a wrapped ``segment_sdpa`` (tests count calls) is used
    return segment_sdpa(*args, **kwargs)


def _dispatch_flex(*args, **kwargs):
    return flex_sdpa(*args, **kwargs)


def _dispatch_varlen(*args, **kwargs):
    return varlen_sdpa(*args, **kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(NAME, _dispatch)
        AttentionInterface.register(FLEX_NAME, _dispatch_flex)
        AttentionInterface.register(VARLEN_NAME, _dispatch_varlen)
        _registered = True


def _configs(core: nn.Module) -> list:
    cfg = core.config
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else cfg
    return [cfg] if text is cfg else [cfg, text]


def _impl(core: nn.Module) -> str:
    return str(getattr(_configs(core)[-1], "_attn_implementation", None) or "")


def _checkpointed_elsewise(core: nn.Module) -> bool:
    """Gradient checkpointing switched on without :func:`checkpoint_context`: its
    recomputation would not see the segment kernel."""
    for m in core.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("context_fn") is not checkpoint_context:
                return True
    return False


def _unsupported(core: nn.Module) -> bool:
    """Model features the starpo kernels do not implement, or the recipe's opt-out."""
    if getattr(core, "starpo_segment_attention", True) is False or _checkpointed_elsewise(core):
        return True
    return any(getattr(c, "sliding_window", None) is not None or
               getattr(c, "attn_logit_softcapping", None) is not None for c in _configs(core))


def _device(core: nn.Module) -> torch.device:
    p = next(core.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _choose(core: nn.Module, off_gpu: str) -> str:
    """The starpo kernel for ``core``'s packed rows: the recipe's ``model.packed_attention``
    when the device offers it, else ``"varlen"`` on CUDA where torch has it, ``"flex"`` on
    CUDA without it, ``off_gpu`` elsewhere (``"segments"``: on a CPU the per-document loop
    is the fastest of them, docs/performance.md)."""
    want = getattr(core, "starpo_packed_attention", "auto")
    dev = _device(core)
    if want in ("varlen", "auto") and (want == "varlen" or dev.type == "cuda") \
            and varlen_device(dev):
        return "varlen"
    if want in ("segments", "flex"):
        return want
    return "flex" if dev.type == "cuda" else off_gpu


def local_attention(core: nn.Module) -> str | None:
    """How ``core`` (an unwrapped HF model) keeps packed documents apart at a cost of
    ``Σ segment²``: ``"flash"`` (its own varlen kernel), ``"varlen"``, ``"flex"`` or
    ``"segments"`` (this module), or None (whole-row attention with a block mask: keep rows
    short)."""
    impl = _impl(core)
    if "flash" in impl:
        return "flash"
    if impl not in ("sdpa", "eager", "flex_attention") or _unsupported(core):
        return None
    return "flex" if impl == "flex_attention" else _choose(core, "segments")


def prefix_attention(core: nn.Module) -> str | None:
    """The kernel that runs ``core``'s prefix-shared rows without a dense mask:
    ``"segments"``, ``"varlen"`` or ``"flex"`` (the latter two also for flash-attention
    models, whose own varlen path cannot keep the rejected response from the chosen one), or
    None."""
    kind = local_attention(core)
    if kind == "flash":
        return None if _unsupported(core) else _choose(core, "flex")
    return kind


def attention_for(core: nn.Module, attention_mask, *, prefix_shared: bool = False) -> str | None:
    """The starpo kernel a training forward of ``core`` on a batch with this mask runs
    (``"segments"`` / ``"varlen"`` / ``"flex"``), or None for the model's own kernel.
    ``prefix_shared``: the rows hold prefix-shared pairs (read from positions)."""
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.dtype != torch.bool:
            return None                       # a padding mask: the model's own kernel
        # a dense prefix mask: only segment attention reads it
        return "segments" if local_attention(core) == "segments" else None
    kind = prefix_attention(core) if prefix_shared else local_attention(core)
    return kind if kind in KERNELS else None


_WHAT = {
    "segments": "sdpa once per packed document (Python loop; the fastest on a CPU)",
    "varlen": "torch's flash-attention varlen kernel, one call per layer",
    "flex": "flex attention with a block-sparse mask (compiled on CUDA)",
    "flash": "flash-attention's own varlen kernel",
}


def describe(core: nn.Module, *, prefix_shared: bool = False) -> str:
    """One log line: which kernel keeps ``core``'s packed rows apart, and whether the
    recipe asked for another one that this device does not offer."""
    kind = prefix_attention(core) if prefix_shared else local_attention(core)
    text = (f"attention: {kind} ({_WHAT[kind]})" if kind else
            "attention: the model's own kernel over whole rows (rows capped; "
            "documents kept apart by masks)")
    want = getattr(core, "starpo_packed_attention", "auto")
    if kind and want != "auto" and want != kind and kind != "flash":
        text += f"; model.packed_attention={want} is not available on {_device(core).type}"
    return text


@contextlib.contextmanager
def segment_attention(core: nn.Module, kind: str = "segments", *, position_ids=None,
                      rows: int | None = None, host_position_ids=None):
    """Run ``core`` (an unwrapped HF model) with the ``kind`` kernel (``"segments"``,
    ``"varlen"`` or ``"flex"``) inside the block.

    The attention layers read ``config._attn_implementation`` at every call, so switching
    it for the duration of one forward is enough; generation (KV cache) never sees it.
    ``host_position_ids``: a CPU copy of the ``position_ids`` tensor the forward will get
    for its ``rows`` rows; the row plans are read from it, so the host does not wait for
    the device to read them.
    """
    global _state
    if kind not in KERNELS:
        raise ValueError(f"unknown starpo attention kernel {kind!r}")
    register()
    name = KERNELS[kind]
    cfgs = _configs(core)
    old = [c._attn_implementation for c in cfgs]
    _state = {}
    if position_ids is not None and host_position_ids is not None and rows is not None:
        host = host_position_ids.expand(rows, -1) if host_position_ids.shape[0] != rows \
            else host_position_ids
        _state.update(ids=position_ids, plan=[_segments(row) for row in host])
    _active.append((cfgs, name))
    try:
        for c in cfgs:
            c._attn_implementation = name
        yield
    finally:
        _active.pop()
        for c, o in zip(cfgs, old):
            c._attn_implementation = o
        _state = {}


@contextlib.contextmanager
def _reinstated(cfgs: list, name: str, state: dict):
    global _state
    old, old_state = [c._attn_implementation for c in cfgs], _state
    _state = state
    try:
        for c in cfgs:
            c._attn_implementation = name
        yield
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o
        _state = old_state


def checkpoint_context():
    """torch.utils.checkpoint's ``context_fn``: called in each checkpointed layer's
    forward; the recomputation in backward runs with the kernel and the segment metadata
    (plans, block mask) that forward ran with."""
    if not _active:
        return contextlib.nullcontext(), contextlib.nullcontext()
    cfgs, name = _active[-1]
    return contextlib.nullcontext(), _reinstated(cfgs, name, _state)


def checkpoint_kwargs() -> dict:
    """The keyword arguments to enable gradient checkpointing with
    (``model.activation_checkpointing_enable(checkpoint_kwargs())``): non-reentrant, with
    :func:`checkpoint_context`, so the segment kernels stay on under recomputation."""
    return {"use_reentrant": False, "context_fn": checkpoint_context}


def one_row_batches(core: nn.Module, *, prefix_shared: bool) -> bool:
    """Whether a micro-batch of packed documents (or of prefix-shared pairs) can be ONE row
    of any length — no row cap, no padding — for ``core``: its attention costs ``Σ
    segment²`` whatever the row length (segment or flex attention; for documents without
    shared prompts also flash-attention's own varlen), and for prefix-shared pairs the kernel
    reads each pair's layout from its positions, so no ``L × L`` mask is built. Gradient
    checkpointing does not change the answer: the loop enables it through
    :func:`checkpoint_kwargs`, which keeps these kernels on during recomputation."""
    if prefix_shared:
        return prefix_attention(core) in KERNELS
    return local_attention(core) in (*KERNELS, "flash")
