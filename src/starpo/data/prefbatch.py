"""Preference batches: padded, padding-free and prefix-shared, all as ``TokenBatch``.

Input: tokenized pairs, dicts (or objects with the same attributes, e.g.
``starpo.data.tokenize.TokenizedPair``) with

    prompt_ids       list[int]   shared by both responses, never trained
    chosen_ids       list[int]   the chosen row is prompt_ids + chosen_ids
    chosen_labels    list[int]   aligned with chosen_ids; the token id where trained, -100 elsewhere
    rejected_ids     list[int]
    rejected_labels  list[int]

Output: one ``TokenBatch`` in which sequence ``2i`` is pair i's chosen response and
``2i + 1`` its rejected one, whatever the layout. So for per-sequence values ``v`` (e.g.
the sums of ``starpo.model.logprobs.sequence_logprobs``) ``v[0::2]`` is chosen and ``v[1::2]``
rejected (:func:`split_pairs`). ``meta`` holds ``layout``, ``num_pairs``, ``pair_index``
(pair of each sequence), ``chosen_seq``/``rejected_seq`` (index tensors) and
``tokens_real`` (non-pad tokens).

Layouts:

* :func:`collate_padded` — the plain computation: one right-padded row per sequence,
  ``[B, L]`` padding mask. Reference for the others.
* :func:`collate_padding_free` — every prompt+response is its own document packed into
  rows; ``position_ids`` restart at 0 per document and ``attention_mask`` is None, which
  transformers turns into block-diagonal causal attention (only with ``use_cache=False``;
  checked in transformers 5.23 ``masking_utils``: packed documents are detected from
  position_ids per row, for any number of rows, only when no mask and no cache is given).
* :func:`collate_prefix_shared` — one segment per pair: prompt, chosen, rejected, computed
  once. A ``[B, 1, L, L]`` bool mask (True = attend): causal inside the segment, except that
  rejected tokens see the prompt and earlier rejected tokens but not the chosen ones;
  rejected ``position_ids`` continue from the prompt's end, so each response computes
  exactly what it would alone. The first target of each response is predicted from the
  last prompt position (explicit targets make that a plain gather).

Padding-free and prefix-shared rows are filled best-fit (largest first) when
``max_tokens_per_row`` is given, else everything goes into one row. Why bound rows: sdpa
on CPU (and any kernel without varlen support) computes attention over the whole
``L × L`` row and materialises the mask, so one huge row costs more attention than a
padded batch; on GPU with flash-attention varlen (padding-free only) a single row is best.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from starpo.data.batch import TokenBatch, new_targets, targets_to_tensors
from starpo.data.packing import best_fit_decreasing

IGNORE = -100


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


def _field(pair: Any, name: str):
    return pair[name] if isinstance(pair, dict) else getattr(pair, name)


def _check_pairs(pairs: Sequence[Any]) -> list[tuple[list[int], list[int], list[int], list[int], list[int]]]:
    """Normalise pairs to tuples (prompt, c_ids, c_lab, r_ids, r_lab) and validate them."""
    if len(pairs) == 0:
        raise ValueError("empty list of preference pairs")
    out = []
    for i, p in enumerate(pairs):
        prompt = list(_field(p, "prompt_ids"))
        fields = []
        for side in ("chosen", "rejected"):
            ids, labels = list(_field(p, f"{side}_ids")), list(_field(p, f"{side}_labels"))
            if len(ids) != len(labels):
                raise ValueError(f"pair {i}: {side}_labels has {len(labels)} entries for "
                                 f"{len(ids)} {side}_ids")
            trained = 0
            for j, (t, lab) in enumerate(zip(ids, labels)):
                if lab == IGNORE:
                    continue
                if lab != t:
                    raise ValueError(f"pair {i}: {side}_labels[{j}] = {lab} but the token is {t} "
                                     f"(a label is the token id or -100)")
                trained += 1
            if trained == 0:
                raise ValueError(f"pair {i}: {side} response has no trained token")
            if not prompt and labels[0] != IGNORE:
                raise ValueError(f"pair {i}: empty prompt and a trained first {side} token "
                                 f"(nothing predicts it)")
            fields += [ids, labels]
        out.append((prompt, *fields))
    return out


def _meta(layout: str, num_pairs: int, tokens_real: int, **extra) -> dict:
    return {
        "layout": layout,
        "num_pairs": num_pairs,
        "pair_index": torch.arange(num_pairs).repeat_interleave(2),
        "chosen_seq": torch.arange(0, 2 * num_pairs, 2),
        "rejected_seq": torch.arange(1, 2 * num_pairs, 2),
        "tokens_real": tokens_real,
        **extra,
    }


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``[2P]`` values -> (chosen ``[P]``, rejected ``[P]``)."""
    return values[0::2], values[1::2]


# ---------------------------------------------------------------------------------------
# row packing
# ---------------------------------------------------------------------------------------


def _best_fit(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Assign items (by index) to rows of ``capacity`` tokens: best-fit decreasing (the
    same packer as SFT). ``capacity=None`` puts everything into one row in input order."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows = best_fit_decreasing(list(lengths), capacity)
    for r in rows:        # inside a row keep input order: deterministic, readable layouts
        r.sort()
    return rows


# ---------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------


def collate_padded(pairs: Sequence[Any], pad_id: int) -> TokenBatch:
    """One right-padded row per sequence (row 2i chosen, 2i+1 rejected), ``[B, L]`` mask.

    The plain computation: every prompt is computed twice. ``position_ids`` are
    ``0..L-1`` on every row (pad positions are masked out and never targets).
    """
    ps = _check_pairs(pairs)
    seqs = []
    for prompt, c_ids, c_lab, r_ids, r_lab in ps:
        seqs.append((prompt + c_ids, [IGNORE] * len(prompt) + c_lab))
        seqs.append((prompt + r_ids, [IGNORE] * len(prompt) + r_lab))
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    tg = new_targets()
    for s, (ids, labels) in enumerate(seqs):
        input_ids[s, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[s, :len(ids)] = 1
        _add_targets(tg, labels, row=s, positions=range(len(ids)), seq=s)
    real = sum(len(ids) for ids, _ in seqs)
    return TokenBatch(
        input_ids=input_ids,
        position_ids=torch.arange(width).repeat(len(seqs), 1),
        attention_mask=attention,
        **targets_to_tensors(tg),
        num_seqs=len(seqs),
        num_pad=input_ids.numel() - real,
        meta=_meta("padded", len(ps), real),
    )


def _add_targets(tg: dict, labels: list[int], *, row: int, positions: Iterable[int],
                 seq: int, predictors: Sequence[int] | None = None) -> None:
    """Targets of one laid-out token list: ``positions[k]`` is where token k sits;
    it is predicted from ``predictors[k]`` (default: ``positions[k] - 1``)."""
    positions = list(positions)
    for k, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        pred = positions[k] - 1 if predictors is None else predictors[k]
        tg["row"].append(row)
        tg["pos"].append(pred)
        tg["ids"].append(lab)
        tg["seq"].append(seq)


def collate_padding_free(pairs: Sequence[Any], max_tokens_per_row: int | None = None, *,
                         pad_id: int = 0) -> TokenBatch:
    """Chosen and rejected rows packed as separate documents, ``attention_mask=None``.

    Documents (prompt + response) are placed in rows best-fit; ``position_ids`` restart at
    0 for each document. Rows are right-padded to the longest row only; the padding of a
    row is one more "document" (positions restart at 0) that no target reads.
    Requires ``use_cache=False`` in the forward (``starpo.model.logprobs`` always does).
    """
    ps = _check_pairs(pairs)
    docs = []
    for prompt, c_ids, c_lab, r_ids, r_lab in ps:
        docs.append((prompt + c_ids, [IGNORE] * len(prompt) + c_lab))
        docs.append((prompt + r_ids, [IGNORE] * len(prompt) + r_lab))
    rows = _best_fit([len(d[0]) for d in docs], max_tokens_per_row)
    width = max(sum(len(docs[i][0]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    tg = new_targets()
    for r, row in enumerate(rows):
        off = 0
        for s in row:
            ids, labels = docs[s]
            n = len(ids)
            input_ids[r, off:off + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, off:off + n] = torch.arange(n)
            _add_targets(tg, labels, row=r, positions=range(off, off + n), seq=s)
            off += n
        position_ids[r, off:] = torch.arange(width - off)
    real = sum(len(d[0]) for d in docs)
    return TokenBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=None,
        **targets_to_tensors(tg), num_seqs=len(docs), num_pad=input_ids.numel() - real,
        meta=_meta("padding_free", len(ps), real, rows=rows),
    )


def collate_prefix_shared(pairs: Sequence[Any], max_tokens_per_row: int | None = None, *,
                          pad_id: int = 0, dense_mask: bool = True) -> TokenBatch:
    """Each pair as one segment ``prompt | chosen | rejected`` with a 4D bool mask.

    Within a segment of a prompt of P tokens, chosen C and rejected R:

        positions   prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1
        mask        prompt, chosen: causal over prompt+chosen
                    rejected:       prompt, and rejected tokens up to itself (not chosen)
        targets     chosen token k from position (k == 0 ? last prompt : chosen k-1),
                    rejected token k from (k == 0 ? last prompt : rejected k-1)

    Segments are block-diagonal (never see each other); several fill a row best-fit.
    Row-end padding attends only to itself (a fully masked query row would give NaN in
    sdpa, and NaN × 0 gradients still poison the weights). ``attention_mask`` is
    ``[B, 1, L, L]`` bool, True = attend; ``starpo.model.logprobs`` adapts it to the model's
    attention kernel (sdpa as is, eager as an additive mask, sliding windows applied).

    ``dense_mask=False``: no mask at all (``attention_mask`` None, ``meta["implicit_prefix"]``
    True). The positions alone say where each rejected response branches off its prompt,
    and :mod:`starpo.model.attention`'s segment attention reads them (any other kernel would let
    rejected tokens see the chosen ones, so :mod:`starpo.model.logprobs` refuses such a batch
    without it). This is what lets a micro-batch of pairs be one row of any length.
    """
    ps = _check_pairs(pairs)
    lengths = [len(p) + len(c) + len(r) for p, c, _, r, _ in ps]
    rows = _best_fit(lengths, max_tokens_per_row)
    width = max(sum(lengths[i] for i in row) for row in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool) if dense_mask else None
    tg = new_targets()
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            prompt, c_ids, c_lab, r_ids, r_lab = ps[i]
            np_, nc, nr = len(prompt), len(c_ids), len(r_ids)
            c0, r0, end = off + np_, off + np_ + nc, off + np_ + nc + nr
            input_ids[r, off:end] = torch.tensor(prompt + c_ids + r_ids, dtype=torch.long)
            position_ids[r, off:r0] = torch.arange(np_ + nc)
            position_ids[r, r0:end] = torch.arange(np_, np_ + nr)
            if mask is not None:
                causal = torch.ones(np_ + nc, np_ + nc, dtype=torch.bool).tril()
                mask[r, 0, off:r0, off:r0] = causal                           # prompt + chosen
                mask[r, 0, r0:end, off:c0] = True                             # rejected -> prompt
                mask[r, 0, r0:end, r0:end] = torch.ones(nr, nr, dtype=torch.bool).tril()
            last_prompt = c0 - 1
            _add_targets(tg, c_lab, row=r, positions=range(c0, r0), seq=2 * i,
                         predictors=[last_prompt] + list(range(c0, r0 - 1)))
            _add_targets(tg, r_lab, row=r, positions=range(r0, end), seq=2 * i + 1,
                         predictors=[last_prompt] + list(range(r0, end - 1)))
            off = end
        pad = torch.arange(off, width)
        if mask is not None:
            mask[r, 0, pad, pad] = True
        position_ids[r, off:] = torch.arange(width - off)
    real = sum(lengths)
    return TokenBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
        **targets_to_tensors(tg), num_seqs=2 * len(ps), num_pad=input_ids.numel() - real,
        meta=_meta("prefix_shared", len(ps), real, rows=rows, implicit_prefix=mask is None),
    )


def tokens_saved(pairs: Sequence[Any]) -> dict:
    """Token accounting of prefix sharing (padding excluded).

        tokens_unshared = Σ (2·|prompt| + |chosen| + |rejected|)   what padding-free computes
        tokens_shared   = Σ (|prompt| + |chosen| + |rejected|)     what prefix sharing computes
        prompt_tokens_saved = Σ |prompt|
        fraction_saved = prompt_tokens_saved / tokens_unshared
    """
    ps = _check_pairs(pairs)
    saved = sum(len(p) for p, *_ in ps)
    shared = sum(len(p) + len(c) + len(r) for p, c, _, r, _ in ps)
    unshared = shared + saved
    return {"prompt_tokens_saved": saved, "tokens_unshared": unshared,
            "tokens_shared": shared, "fraction_saved": saved / unshared}


def collate_pairs(pairs: Sequence[Any], *, prefix_sharing: bool, padding_free: bool,
                  cap: int | None, pad_id: int = 0) -> TokenBatch:
    """A micro-batch of pairs in one of the three layouts: prefix-shared, padding-free or
    padded. ``cap`` is the row cap of the packed layouts (:func:`starpo.model.layout.row_cap`):
    ``None`` makes one row of any length, and a prefix-shared row then carries no dense
    mask (segment attention reads each pair's branch from its positions)."""
    if prefix_sharing:
        return collate_prefix_shared(pairs, cap, dense_mask=cap is not None)
    if padding_free:
        return collate_padding_free(pairs, cap)
    return collate_padded(pairs, pad_id)
