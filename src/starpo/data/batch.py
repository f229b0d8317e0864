"""The one batch shape every stage feeds to the model.

A batch is a few *rows* of tokens (packed documents, padded sequences, or prompt+chosen+
rejected rows with a shared prefix) plus an explicit list of *targets*: which token is
predicted from which position, and to which sequence its log-prob belongs.

Why explicit targets instead of ``labels`` shifted by one: with prefix sharing the first
token of the rejected response is predicted from the last *prompt* position, which is not
the position just before it in the row. Listing (row, predictor position, target id,
sequence id) handles packing, padding and prefix sharing with one gather, and only the
hidden states of target positions ever reach the vocabulary projection.

Shapes (B rows, L tokens per row, N trainable targets, S sequences):

    input_ids      [B, L] long
    position_ids   [B, L] long    restart at 0 for each packed document
    attention_mask None           rows are packed/unpadded: documents isolated by position_ids
                   [B, L] long    padded rows: 1 = real token
                   [B, 1, L, L]   bool, True = may attend (prefix sharing)
    tgt_row        [N] long       row of each target
    tgt_pos        [N] long       position whose hidden state predicts the target
    tgt_ids        [N] long       the target token id
    tgt_seq        [N] long       sequence index in 0..S-1 the target belongs to
    num_seqs       S
    num_tokens     computed tokens (B·L minus nothing: what the forward pays for)
    num_pad        padding tokens among them
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    tgt_row: torch.Tensor
    tgt_pos: torch.Tensor
    tgt_ids: torch.Tensor
    tgt_seq: torch.Tensor
    num_seqs: int
    num_pad: int = 0
    meta: dict = field(default_factory=dict)   # stage-specific (pair index of each seq, …)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return int(self.tgt_ids.numel())

    def to(self, device) -> "TokenBatch":
        """The batch on ``device``. Moving off the CPU keeps the CPU ``position_ids`` in
        ``meta["host_position_ids"]``: the attention kernels read each row's documents from
        them (:mod:`starpo.model.attention`), and reading the device copy would make the
        host wait for the GPU at the start of every forward."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        host = self.meta.get("host_position_ids")
        if host is None and self.position_ids.device.type == "cpu":
            host = self.position_ids
        if host is not None and kw["position_ids"].device.type != "cpu":
            kw["meta"] = {**self.meta, "host_position_ids": host}
        return TokenBatch(**kw)


def targets_from_labels(labels: list[int], *, row: int, offset: int, seq: int,
                        out: dict[str, list[int]]) -> None:
    """Append the targets of one document laid out contiguously in a row.

    ``labels[i]`` is the token at position ``offset + i`` if trained, else -100. Token i is
    predicted from position ``offset + i - 1``; a label on the first token of a document
    has no predictor and is an error upstream (tokenization never produces one).
    """
    for i, lab in enumerate(labels):
        if lab < 0:
            continue
        if i == 0:
            raise ValueError("the first token of a document cannot be a target")
        out["row"].append(row)
        out["pos"].append(offset + i - 1)
        out["ids"].append(lab)
        out["seq"].append(seq)


def new_targets() -> dict[str, list[int]]:
    return {"row": [], "pos": [], "ids": [], "seq": []}


def targets_to_tensors(t: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {f"tgt_{k}": torch.tensor(v, dtype=torch.long) for k, v in t.items()}
