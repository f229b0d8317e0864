"""SFT batching: the LIONs paper's variants — padding or packing, each with or without
loss masking — plus its "concatenate and cut" variant.

* ``pad``: one conversation per row, right-padded to the longest in the micro-batch, with
  a 2D attention mask.
* ``pack``: conversations are placed whole into rows of ``max_length`` tokens by
  best-fit-decreasing; position_ids restart at 0 for every document, which makes
  transformers build a block-diagonal mask (sdpa/eager) or use FlashAttention varlen, so
  attention never crosses documents. The forward must run with ``use_cache=False``: with a
  KV-cache object transformers ignores the packed layout (measured: 0.5 logit error).
* ``concat``: the token stream of all conversations is cut into rows of exactly
  ``max_length``; documents split across rows restart their positions in the new row;
  rows with more than ``drop_masked_ratio`` of untrained tokens are dropped (LIONs).

Without loss masking every token but a document's first is a target; with it only the
assistant tokens are (see :mod:`starpo.data.tokenize`).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from starpo.data.batch import TokenBatch, new_targets, targets_from_labels, targets_to_tensors
from starpo.data.tokenize import IGNORE, TokenizedSFT


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of items grouped into bins of ``capacity``, best-fit-decreasing.

    Longest item first; each goes into the open bin with the least room that still fits it
    (O(n log n) with a sorted list of remaining capacities). Items longer than the capacity
    are a caller error (truncate first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of {n} tokens does not fit a row of {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            rem, b = room.pop(k)
            bins[b].append(i)
            bisect.insort(room, (rem - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


Segment = tuple[list[int], list[int]]  # (input_ids, labels) of one document (or a piece)


@dataclass
class SFTLayout:
    rows: list[list[Segment]]   # each row: the documents laid out in it
    mode: str
    truncated: int = 0
    dropped_rows: int = 0


def _maybe_unmask(doc: TokenizedSFT, loss_masking: bool) -> Segment:
    if loss_masking:
        return doc.input_ids, doc.labels
    return doc.input_ids, [IGNORE] + doc.input_ids[1:]


def layout_sft(docs: list[TokenizedSFT], *, mode: str, loss_masking: bool, max_length: int,
               drop_masked_ratio: float = 0.9, seed: int = 0) -> SFTLayout:
    """Arrange tokenized conversations into rows (deterministic for a seed)."""
    segs = [_maybe_unmask(d, loss_masking) for d in docs]
    truncated = 0
    if mode in ("pack", "pad"):
        cut = []
        for ids, lab in segs:
            if len(ids) > max_length:
                truncated += 1
                ids, lab = ids[:max_length], lab[:max_length]
            if any(x != IGNORE for x in lab):
                cut.append((ids, lab))
        segs = cut
    if mode == "pad":
        return SFTLayout([[s] for s in segs], mode, truncated)
    if mode == "pack":
        bins = best_fit_decreasing([len(s[0]) for s in segs], max_length)
        return SFTLayout([[segs[i] for i in b] for b in bins], mode, truncated)
    if mode == "concat":
        order = list(range(len(segs)))
        random.Random(seed).shuffle(order)
        rows, cur, used, dropped = [], [], 0, 0
        for i in order:
            ids, lab = segs[i]
            while ids:
                take = min(len(ids), max_length - used)
                piece_lab = list(lab[:take])
                piece_lab[0] = IGNORE  # a piece's first token has no predictor in its row
                cur.append((ids[:take], piece_lab))
                used += take
                ids, lab = ids[take:], lab[take:]
                if used == max_length:
                    rows.append(cur)
                    cur, used = [], 0
        if cur:
            rows.append(cur)
        kept = []
        for row in rows:
            n = sum(len(s[0]) for s in row)
            trained = sum(1 for s in row for x in s[1] if x != IGNORE)
            if trained == 0 or (loss_masking and 1 - trained / n > drop_masked_ratio):
                dropped += 1
                continue
            kept.append(row)
        return SFTLayout(kept, mode, truncated, dropped)
    raise ValueError(f"unknown packing mode {mode!r}")


def collate_rows(rows: list[list[Segment]], *, pad_id: int, padded: bool,
                 flat: bool = False) -> TokenBatch:
    """Build a TokenBatch from rows of segments.

    ``padded`` (pad mode): one segment per row, a 2D attention mask marks padding.
    Otherwise (pack/concat): positions restart per segment, no attention mask; the tail
    of a shorter row is filled with pad tokens forming their own dummy document.
    ``flat`` (pack/concat only): the rows are laid end to end as one row, so nothing is
    padded. Only for attention that costs ``Σ document²`` whatever the row length
    (flash-attention varlen, :mod:`starpo.model.attention`); whole-row attention would pay
    ``(rows × length)²``.
    """
    if flat and not padded:
        rows = [[seg for row in rows for seg in row]]
    L = max(sum(len(s[0]) for s in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long) if padded else None
    tg = new_targets()
    seq = 0
    num_pad = 0
    for r, row in enumerate(rows):
        off = 0
        for s_ids, s_lab in row:
            n = len(s_ids)
            ids[r, off:off + n] = torch.tensor(s_ids, dtype=torch.long)
            pos[r, off:off + n] = torch.arange(n)
            if mask is not None:
                mask[r, off:off + n] = 1
            targets_from_labels(s_lab, row=r, offset=off, seq=seq, out=tg)
            seq += 1
            off += n
        if off < L:
            num_pad += L - off
            pos[r, off:] = torch.arange(L - off)
    return TokenBatch(input_ids=ids, position_ids=pos, attention_mask=mask,
                      **targets_to_tensors(tg), num_seqs=seq, num_pad=num_pad)


def sft_microbatches(layout: SFTLayout, *, batch_size: int, pad_id: int, seed: int,
                     epoch: int, flat: bool = False) -> list[TokenBatch]:
    """Micro-batches of ``batch_size`` rows for one epoch (row order shuffled per epoch).

    ``flat``: each micro-batch is its rows laid end to end (see :func:`collate_rows`); the
    rows, their order and the targets are the same, only the padding goes.
    """
    order = list(range(len(layout.rows)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    padded = layout.mode == "pad"
    out = []
    for k in range(0, len(order), batch_size):
        rows = [layout.rows[i] for i in order[k:k + batch_size]]
        out.append(collate_rows(rows, pad_id=pad_id, padded=padded, flat=flat))
    return out


def padding_fraction(batches: list[TokenBatch]) -> float:
    total = sum(b.num_tokens for b in batches)
    return sum(b.num_pad for b in batches) / max(total, 1)
