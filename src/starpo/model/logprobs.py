"""Per-sequence log-probs from any batch layout, without full-vocabulary logits.

The vocabulary projection dominates memory in preference training: a plain forward keeps
``[rows, length, vocab]`` logits plus their log-softmax for backward. Here only the hidden
states of *target* positions (``TokenBatch.tgt_row/tgt_pos``) reach the LM head, and they
go through it in chunks of ``chunk_size`` rows inside a custom autograd function that
saves only its inputs and recomputes each chunk's logits in backward. Peak extra memory is
O(chunk_size × vocab) instead of O(N × vocab) for N targets, in forward *and* backward.

Peak extra memory and time against the plain path are in BENCHMARKS.md ("Memory of the
chunked LM head").

A [chunk, V] float32 buffer is chunk·V·4 bytes: with Gemma's 256k vocabulary use
chunk_size ≈ 128 to stay near 128 MB per buffer.

    target_logprobs(hidden [N,H], lm_head, targets [N])        -> [N] float32
    sequence_logprobs(model, batch)                             -> sums [S], counts [S], per-target [N]
    plain_sequence_logprobs(model, batch)                       -> same, via full logits (tests)
    TargetLogprobs(model)                                       nn.Module wrapper for DDP/FSDP

Model support. The transformer body is ``model.get_decoder()`` (``LlamaModel``,
``GPTNeoXModel``, ``Gemma2Model``, ...) and the head ``model.get_output_embeddings()``;
the body is always called with ``use_cache=False`` (with a cache object, transformers
does not isolate packed documents). Logit transforms a model applies after its head are
read from the (text) config by :func:`logit_transform`:

    final_logit_softcapping   z = c·tanh(z/c)                   Gemma-2/3/4, ...
    logit_scale               z = s·z                           Cohere, Cohere2
    logits_scaling            z = z/s  (HyperCLOVA X: z·s)      Granite family
    lm_head_multiplier        z = s·z                           Falcon-H1
    output_multiplier         z = s·z (before the softcap)      Muse

Anything else a model does to its logits (vocabulary slicing, custom heads) is not
covered: call :func:`verify_logit_head` once after loading a model of a new family.

Attention masks (``TokenBatch.attention_mask``): ``None`` (packed rows, documents
isolated by restarting ``position_ids``), ``[B, L]`` padding masks, or ``[B, 1, L, L]``
boolean masks (prefix sharing). transformers passes a 4D mask to the attention kernel
untouched: sdpa reads a bool mask as True = attend, while eager *adds* the mask to the
scores, so :func:`model_attention_mask` converts it to an additive float mask for eager
attention and refuses other kernels (flash-attention and flex take no dense 4D mask).
For models with sliding-window layers, whose window transformers cannot apply to a
custom 4D mask, the window is applied here on ``position_ids`` distances (a per-layer-type
dict of masks when the model mixes full and sliding layers, as Gemma-2 does).

Packed and prefix-shared rows run their attention per document segment (sdpa/eager:
segment attention; flex_attention models and the prefix-shared rows of flash-attention
models: flex attention with a block mask; see :mod:`starpo.model.attention`) instead of
over the whole row; :func:`plain_sequence_logprobs` keeps transformers' own whole-row path
as reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from starpo.model.attention import attention_for, local_attention, segment_attention
from starpo.data.batch import TokenBatch

# ---------------------------------------------------------------------------------------
# chunked log p(target) from hidden states
# ---------------------------------------------------------------------------------------


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                  softcap: float | None, compute_dtype: torch.dtype) -> Tensor:
    """Logits of one chunk in float32, after the model's scale and softcap. ``weight`` is
    already in ``compute_dtype`` (cast once per call, not once per chunk)."""
    z = h.to(compute_dtype) @ weight.t()
    if bias is not None:
        z = z + bias.to(compute_dtype)
    z = z.float()
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


class _ChunkedTargetLogprob(torch.autograd.Function):
    """log softmax(scale·(hWᵀ + b), softcapped)[target], chunked over rows.

    Saves only (hidden, weight, bias, targets); backward recomputes each chunk's logits.
    With z the final logits of a row, p = softmax(z) and g the incoming gradient:
        d/dz = g·(onehot(target) − p)
        softcap: z = c·tanh(u/c)  =>  dz/du = 1 − (z/c)²
        scale:   u = s·a          =>  du/da = s,   a = hWᵀ + b
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, compute_dtype):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        w = weight.to(compute_dtype)
        with torch.autocast(device_type, enabled=False):
            for s in range(0, n, chunk_size):
                z = _chunk_logits(hidden[s:s + chunk_size], w, bias, scale, softcap,
                                  compute_dtype)
                t = targets[s:s + chunk_size]
                out[s:s + chunk_size] = z.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(z, 1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        ctx.compute_dtype = compute_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk_size, scale, softcap, cdt = ctx.chunk_size, ctx.scale, ctx.softcap, ctx.compute_dtype
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate weight/bias gradients over chunks in float32, cast once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if need_b and bias is not None else None)
        w = weight.to(cdt)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                h = hidden[s:s + chunk_size]
                t = targets[s:s + chunk_size]
                g = grad_out[s:s + chunk_size].float()
                z = _chunk_logits(h, w, bias, scale, softcap, cdt)
                # d softcap / du = 1 − (z/c)², taken before z is overwritten
                cap_grad = None if softcap is None else (z / softcap).square_().neg_().add_(1.0)
                # z becomes −g·softmax(z) in place: one [chunk, V] buffer, not three
                dz = z.sub_(torch.logsumexp(z, 1, keepdim=True)).exp_().mul_(-g[:, None])
                dz.scatter_add_(1, t[:, None], g[:, None])
                if cap_grad is not None:
                    dz.mul_(cap_grad)
                    del cap_grad
                if scale != 1.0:
                    dz.mul_(scale)
                if need_h:
                    grad_h[s:s + chunk_size] = (dz.to(cdt) @ w).to(hidden.dtype)
                if need_w:
                    grad_w.add_((dz.to(cdt).t() @ h.to(cdt)).float())
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def target_logprobs(hidden: Tensor, lm_head: nn.Module | Tensor, targets: Tensor,
                    chunk_size: int = 1024, softcap: float | None = None, *,
                    scale: float = 1.0) -> Tensor:
    """log p(target) for each row of ``hidden``, never materialising all ``[N, V]`` logits.

        logits_i = softcap(scale · (hidden_i · Wᵀ + b))     softcap(z) = c·tanh(z/c)
        out_i    = logits_i[targets_i] − logsumexp(logits_i)

    Args:
        hidden: ``[N, H]`` final hidden states (after the body's final norm).
        lm_head: the output projection: an ``nn.Module`` with ``.weight [V, H]`` (and an
            optional ``.bias [V]``), or the weight tensor itself.
        targets: ``[N]`` long, token ids in ``[0, V)``.
        chunk_size: rows projected at once; peak extra memory ≈ 3 · chunk_size · V · 4 bytes
            (forward and backward alike).
        softcap / scale: the model's final logit transform (see :func:`logit_transform`).

    Returns ``[N]`` float32, differentiable w.r.t. ``hidden`` and the head's parameters.
    The matmuls run in the autocast dtype when autocast is on, else in the promoted dtype
    of hidden and weight; softmax and the returned values are always float32.
    """
    if isinstance(lm_head, Tensor):
        weight, bias = lm_head, None
    else:
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"target_logprobs expects hidden [N, H] and targets [N]; got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _ChunkedTargetLogprob.apply(hidden, weight, bias, targets.to(hidden.device),
                                       int(chunk_size), float(scale),
                                       None if softcap is None else float(softcap), compute_dtype)


# ---------------------------------------------------------------------------------------
# model plumbing
# ---------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP / accelerate / PEFT / our wrapper."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, TargetLogprobs):
            model = model.model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and \
                not hasattr(model, "get_output_embeddings"):
            model = model.module                      # DDP / DataParallel / DeepSpeed engine
        elif hasattr(model, "get_base_model") and callable(model.get_base_model) and \
                type(model).__name__.startswith("Peft"):
            model = model.get_base_model()            # PEFT: LoRA layers live inside it
        else:
            break
    return model


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` a model applies to its head's output: z ← softcap(scale·z).

    Read from the text config: ``final_logit_softcapping`` (softcap); ``logit_scale``,
    ``lm_head_multiplier``, ``output_multiplier`` (multiply); ``logits_scaling`` (divide,
    except HyperCLOVA X which multiplies). ``(1.0, None)`` for plain models.
    """
    tc = _text_config(config)
    softcap = getattr(tc, "final_logit_softcapping", None)
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        v = getattr(tc, name, None)
        if v is not None:
            scale = float(v)
            break
    else:
        v = getattr(tc, "logits_scaling", None)
        if v is not None:
            scale = float(v) if str(getattr(tc, "model_type", "")).startswith("hyperclovax") \
                else 1.0 / float(v)
    return scale, (None if softcap is None else float(softcap))


def model_attention_mask(model: nn.Module, batch: TokenBatch):
    """The attention mask to hand to ``model`` (or its body) for ``batch``.

    ``None`` and 2D masks pass through. A 4D bool mask (True = attend) is adapted to the
    model: sliding-window layers get the window applied on position distances, and eager
    attention gets an additive float mask (0 / dtype-min). Other kernels raise.
    """
    m = batch.attention_mask
    if m is None or m.dim() == 2:
        return m
    if m.dim() != 4 or m.dtype != torch.bool:
        raise ValueError("a 4D attention_mask must be bool [B, 1, L, L] (True = attend)")
    core = unwrap_model(model)
    cfg = _text_config(core.config)
    impl = getattr(cfg, "_attn_implementation", None) or getattr(core.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"prefix-shared batches (4D attention masks) need attn_implementation "
                         f"'sdpa' or 'eager'; this model uses {impl!r}")

    masks: Tensor | dict[str, Tensor] = m
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    pos = batch.position_ids.to(m.device)
    if window is not None and (layer_types is None or "sliding_attention" in layer_types) \
            and int(pos.max()) >= int(window):     # else no two tokens are a window apart
        near = (pos[:, :, None] - pos[:, None, :]) < int(window)       # q − kv < window
        windowed = m & near[:, None]
        if not torch.equal(windowed, m):
            if layer_types is None:       # every layer slides (Mistral-style configs)
                masks = windowed
            else:
                unknown = set(layer_types) - {"full_attention", "sliding_attention"}
                if unknown:
                    raise ValueError(f"4D attention masks are not supported with layer types "
                                     f"{sorted(unknown)}")
                masks = {t: (windowed if t == "sliding_attention" else m) for t in set(layer_types)}

    if impl == "eager":
        dtype = core.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        neg = torch.finfo(dtype).min

        def additive(x: Tensor) -> Tensor:
            return torch.zeros(x.shape, dtype=dtype, device=x.device).masked_fill_(~x, neg)

        masks = {k: additive(v) for k, v in masks.items()} if isinstance(masks, dict) else additive(masks)
    return masks


def _sum_per_sequence(target_lp: Tensor, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    seq = batch.tgt_seq.to(target_lp.device)
    sums = torch.zeros(batch.num_seqs, dtype=target_lp.dtype, device=target_lp.device)
    sums = sums.index_add(0, seq, target_lp)
    counts = torch.bincount(seq, minlength=batch.num_seqs)
    return sums, counts


def _check_implicit_prefix(batch: TokenBatch, kernel: bool) -> None:
    """A prefix-shared batch built without a mask is correct only under starpo's segment or
    flex kernels (``kernel``: whether this forward runs one)."""
    if batch.meta.get("implicit_prefix") and not kernel:
        raise ValueError("this prefix-shared batch has no attention mask (dense_mask=False): "
                         "only starpo's segment/flex attention reads its layout (sdpa, eager, "
                         "flex_attention or flash-attention models, model.segment_attention "
                         "on); build it with a mask")


def body_hidden_states(core: nn.Module, body: nn.Module, batch: TokenBatch) -> Tensor:
    """Last hidden states ``[B, L, H]`` of the transformer ``body`` of ``core`` (an
    unwrapped HF model) on ``batch``, with ``use_cache=False`` (a cache object would make
    transformers ignore the packed layout) and attention per packed document where
    :func:`starpo.model.attention.attention_for` says so (``Σ segment²`` instead of ``L²``).

    Flash-attention models read packed documents from ``position_ids`` only in a batch of
    one row, so several packed rows (no mask; each row starts a document) are run as one
    row ``[1, B·L]`` and the hidden states reshaped back."""
    kind = attention_for(core, batch.attention_mask,
                         prefix_shared=bool(batch.meta.get("implicit_prefix")))
    _check_implicit_prefix(batch, kind is not None)
    ids, pos = batch.input_ids, batch.position_ids
    if kind is not None:
        with segment_attention(core, kind, position_ids=pos, rows=ids.shape[0],
                               host_position_ids=batch.meta.get("host_position_ids")):
            out = body(input_ids=ids, attention_mask=batch.attention_mask, position_ids=pos,
                       use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
    rows, length = ids.shape
    flat = (batch.attention_mask is None and rows > 1 and local_attention(core) == "flash")
    if flat:
        pos = pos.expand(rows, -1) if pos.shape[0] != rows else pos
        if not bool((pos[:, 0] == 0).all()):
            raise ValueError("packed rows for flash-attention must each start a document "
                             "(position 0)")
        ids, pos = ids.reshape(1, -1), pos.reshape(1, -1)
    out = body(input_ids=ids, attention_mask=model_attention_mask(core, batch),
               position_ids=pos, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden.reshape(rows, length, -1) if flat else hidden


def sequence_logprobs(model: nn.Module, batch: TokenBatch, chunk_size: int = 1024
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Summed target log-probs per sequence, through the chunked LM head.

    Runs the transformer body once on ``batch`` (``use_cache=False``), gathers the hidden
    states at ``(tgt_row, tgt_pos)``, and scores ``tgt_ids`` with :func:`target_logprobs`.

    Returns:
        sums    ``[S]`` float32   Σ log p over each sequence's targets (0 for none)
        counts  ``[S]`` long      number of targets of each sequence
        per_target ``[N]`` float32  log p of each target, in batch order
    Differentiable w.r.t. the model's parameters. ``batch`` must already be on the
    model's device.
    """
    core = unwrap_model(model)
    hidden = body_hidden_states(core, core.get_decoder(), batch)
    head = core.get_output_embeddings()
    h = hidden[batch.tgt_row.to(hidden.device), batch.tgt_pos.to(hidden.device)]
    scale, softcap = logit_transform(core.config)
    h = h.to(head.weight.device)
    per_target = target_logprobs(h, head, batch.tgt_ids.to(h.device), chunk_size,
                                 softcap, scale=scale)
    sums, counts = _sum_per_sequence(per_target, batch)
    return sums, counts, per_target


def plain_sequence_logprobs(model: nn.Module, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Reference path for tests: the model's own forward, full ``[B, L, V]`` logits,
    float32 log-softmax, gather. Same outputs as :func:`sequence_logprobs`."""
    core = unwrap_model(model)
    _check_implicit_prefix(batch, kernel=False)
    out = core(input_ids=batch.input_ids, attention_mask=model_attention_mask(core, batch),
               position_ids=batch.position_ids, use_cache=False)
    logp = F.log_softmax(out.logits.float(), dim=-1)
    dev = logp.device
    per_target = logp[batch.tgt_row.to(dev), batch.tgt_pos.to(dev), batch.tgt_ids.to(dev)]
    sums, counts = _sum_per_sequence(per_target, batch)
    return sums, counts, per_target


class TargetLogprobs(nn.Module):
    """``forward(batch) = sequence_logprobs(model, batch)`` as a module.

    ``sequence_logprobs`` calls the model's body and head directly, bypassing the model's
    own ``forward``. Under DDP/FSDP the wrapper's ``forward`` is what must run (gradient
    sync, parameter gathering), so the training loop prepares *this* module with accelerate
    rather than the bare model. ``self.model`` stays the Hugging Face model (save it,
    generate with it).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def _no_split_modules(self):
        # FSDP's transformer-based auto wrap reads this from the module it prepares (this
        # wrapper): the wrapped model's decoder layer classes become the wrap units
        return getattr(unwrap_model(self.model), "_no_split_modules", None)

    def forward(self, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor]:
        return sequence_logprobs(self.model, batch, chunk_size=self.chunk_size)


@torch.no_grad()
def verify_logit_head(model: nn.Module, *, length: int = 8, atol: float = 1e-3) -> float:
    """Check that the chunked head reproduces ``model``'s own log-probs on a short input.

    Call it once after loading a model of a family not listed in this module's docstring
    (it runs one tiny forward each way). Returns the max absolute difference; raises
    ``ValueError`` when it exceeds ``atol`` (e.g. a logit transform this module does not
    know). The tolerance is loose to admit bf16 models.
    """
    core = unwrap_model(model)
    vocab = core.get_output_embeddings().weight.shape[0]
    dev = core.get_output_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, length), generator=g).to(dev)
    n = length - 1
    zeros = torch.zeros(n, dtype=torch.long, device=dev)
    batch = TokenBatch(input_ids=ids, position_ids=torch.arange(length, device=dev)[None],
                       attention_mask=None, tgt_row=zeros, tgt_pos=torch.arange(n, device=dev),
                       tgt_ids=ids[0, 1:], tgt_seq=zeros, num_seqs=1)
    was_training = core.training
    core.eval()
    try:
        fast = sequence_logprobs(core, batch)[2]
        plain = plain_sequence_logprobs(core, batch)[2]
    finally:
        core.train(was_training)
    diff = float((fast - plain).abs().max())
    if diff > atol:
        raise ValueError(f"{type(core).__name__}: chunked log-probs differ from the model's own "
                         f"by {diff:.3g} (> {atol}); its head applies a transform "
                         f"starpo.model.logprobs does not know (see logit_transform)")
    return diff
