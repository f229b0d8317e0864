"""Tokenization: render with the chat template, tokenize once, labels from token offsets.

Why this route: most chat templates (Llama-3, Gemma, Qwen) carry no ``{% generation %}``
markers, so transformers cannot return an assistant mask for them. Instead we

1. render the conversation to text with the tokenizer's chat template;
2. find each assistant turn's *character* span by rendering prefixes of the conversation:
   the turn starts where ``render(messages[:i], add_generation_prompt=True)`` ends and
   stops where ``render(messages[:i+1])`` ends (minus trailing whitespace, so the span runs
   through the end-of-turn token but not the newline the template writes after it);
3. tokenize the full text once with ``return_offsets_mapping`` and
   ``add_special_tokens=False`` (the template already wrote any BOS: no double BOS);
4. train every token whose character span overlaps an assistant span.

Step 4 is where BPE merges across the prompt/response boundary are handled: a token that
straddles the boundary is kept whole and trained, never split or dropped; we never search
decoded text for strings.

Offsets are read as the characters each token covers, whatever convention the tokenizer
reports them in:

* ByteLevel post-processors with ``trim_offsets: true`` (the GPT-NeoX/Pythia family,
  Roberta) cut whitespace out of the reported spans, so a token made of spaces reports
  ``(a, a)`` and ``" return"`` reports only ``return``. Called with
  ``add_special_tokens=False`` a post-processor adds no token, so :func:`encode` runs the
  one tokenization without it: same ids, full spans (:func:`_untrimmed`).
* A zero-width token that is left (other conventions) is placed between its neighbours:
  it stands for the text from the end of the tokens before it to its own position and is
  trained when that text overlaps an assistant span; with no text there it is a point,
  trained when ``start <= position < end`` (:func:`_labels_from_offsets`).
"""

from __future__ import annotations

import bisect
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from starpo.errors import DataError

IGNORE = -100


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict], *, source: str = "?",
                         row: int = -1, untrained: frozenset[int] = frozenset()
                         ) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end) of each trained assistant turn]).

    ``untrained`` lists message indices kept as context only (ShareGPT ``weight: 0``).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i in untrained:
            continue
        before = _generation_prefix(tokenizer, messages[:i])
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "the chat template does not render conversations prefix-consistently (a "
                "later turn changes the text of an earlier one), so assistant tokens cannot "
                "be located; set model.chat_template to a template without that behaviour",
                source=source, row=row, field="messages")
        start, end = len(before), len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    return text, spans


def _generation_prefix(tokenizer, messages: list[dict]) -> str:
    """Text the template writes before an assistant turn that follows ``messages``."""
    try:
        return render(tokenizer, messages, add_generation_prompt=True)
    except Exception:
        if messages:
            raise
        return ""  # some templates refuse an empty conversation; nothing precedes the turn


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]],
                         spans: list[tuple[int, int]]) -> list[int]:
    """Labels: ``ids[k]`` where token k lies inside an assistant span, IGNORE elsewhere.

    ``spans`` are sorted, disjoint ``(start, end)`` character spans. A token with a width
    is inside when its span overlaps one (so a token straddling a boundary is trained
    whole). A zero-width token ``(a, a)`` stands for the characters between the end of the
    tokens before it and ``a`` (where trimming tokenizers leave the whitespace they cut):
    it is inside when those characters overlap a span; when there are none it is a point,
    inside a span that starts at or before ``a`` and ends after it.
    """
    labels = [IGNORE] * len(ids)
    ends = [e for _, e in spans]
    covered = 0   # end of the text the tokens so far account for
    for k, (a, b) in enumerate(offsets):
        lo, hi = (a, b) if b > a else (min(covered, a), a)
        # spans are disjoint and sorted: the first one ending after lo is the only candidate
        j = bisect.bisect_right(ends, lo)
        if j < len(spans):
            s, e = spans[j]
            if (hi > s) if hi > lo else (s <= lo < e):
                labels[k] = ids[k]
        covered = max(covered, b)
    return labels


# Swapping the post-processor out for one encode must not interleave with another thread
# doing the same on the same tokenizer: the swaps of this module take turns.
_SWAP = threading.Lock()


def _trims_offsets(state) -> bool:
    """Whether a post-processor's JSON state trims offsets (nested ones included)."""
    if isinstance(state, dict):
        return state.get("trim_offsets") is True or any(_trims_offsets(v)
                                                        for v in state.values())
    if isinstance(state, list):
        return any(_trims_offsets(v) for v in state)
    return False


@contextmanager
def _untrimmed(tokenizer):
    """Within the block the tokenizer reports full offsets (no post-processor trimming).

    Only offsets change: encoding with ``add_special_tokens=False``, no post-processor adds
    or removes a token (Template, Roberta and Bert processing add special tokens only when
    asked, ByteLevel only trims offsets), so the ids are those of the tokenizer as it is.
    Tokenizers whose post-processor does not trim are left untouched.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    post = getattr(backend, "post_processor", None) if backend is not None else None
    try:
        trims = post is not None and _trims_offsets(json.loads(post.__getstate__()))
    except Exception:  # a state we cannot read: leave the tokenizer alone
        trims = False
    if not trims:
        yield
        return
    with _SWAP:
        backend.post_processor = None
        try:
            yield
        finally:
            backend.post_processor = post


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens added) and each token's full character span."""
    with _untrimmed(tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


@dataclass
class TokenizedSFT:
    input_ids: list[int]
    labels: list[int]
    source: str
    row: int

    @property
    def num_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenize_conversation(tokenizer, messages: list[dict], *, source: str = "?",
                          row: int = -1, untrained=()) -> TokenizedSFT:
    """Tokenize one conversation; labels are the ids of assistant tokens, -100 elsewhere.

    Every assistant turn is trained, through its end-of-turn token. A conversation with no
    trainable token is an error naming the row (it would silently train on nothing).
    """
    untrained = frozenset(untrained or ())
    if not any(m["role"] == "assistant" and m["content"].strip() and i not in untrained
               for i, m in enumerate(messages)):
        raise DataError("every trained assistant message is empty: nothing to train on",
                        source=source, row=row, field="messages")
    text, spans = assistant_char_spans(tokenizer, messages, source=source, row=row,
                                       untrained=untrained)
    ids, offsets = encode(tokenizer, text)
    labels = _labels_from_offsets(ids, offsets, spans)
    if labels and labels[0] != IGNORE:
        # nothing predicts the first token of a document; it is context, not a target
        labels[0] = IGNORE
    out = TokenizedSFT(ids, labels, source, row)
    if out.num_trainable == 0:
        raise DataError("conversation has no trainable (assistant) token after rendering "
                        "with the chat template", source=source, row=row, field="messages")
    return out


@dataclass
class TokenizedPair:
    """A preference pair: shared prompt tokens, then each response's tokens and labels.

    ``chosen_ids``/``rejected_ids`` may begin with a few prompt-side tokens (label -100)
    when a BPE merge across the prompt/response boundary made the two conversations'
    tokens diverge before the response starts; the prompt proper is shared exactly.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    source: str = "?"
    row: int = -1

    def as_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids,
                "chosen_labels": self.chosen_labels, "rejected_ids": self.rejected_ids,
                "rejected_labels": self.rejected_labels}

    @property
    def num_chosen(self) -> int:
        return sum(1 for x in self.chosen_labels if x != IGNORE)

    @property
    def num_rejected(self) -> int:
        return sum(1 for x in self.rejected_labels if x != IGNORE)


def _response_tokens(tokenizer, prompt: list[dict], response: list[dict], source, row):
    conv = prompt + response
    text, spans = assistant_char_spans(tokenizer, conv, source=source, row=row)
    # only the response's assistant turns are trained, not assistant turns in the prompt
    n_prompt_asst = sum(1 for m in prompt if m["role"] == "assistant")
    spans = spans[n_prompt_asst:]
    ids, offsets = encode(tokenizer, text)
    labels = _labels_from_offsets(ids, offsets, spans)
    boundary = spans[0][0] if spans else len(text)
    # prompt tokens: those ending at or before the response's first character
    n_prompt = 0
    while n_prompt < len(ids) and offsets[n_prompt][1] <= boundary and labels[n_prompt] == IGNORE:
        n_prompt += 1
    return ids, labels, n_prompt


@dataclass
class PairStats:
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    dropped: list = field(default_factory=list)   # (source, row, reason) of the first few


def tokenize_pair(tokenizer, row: dict, *, max_length: int, max_prompt_length: int,
                  stats: PairStats | None = None) -> TokenizedPair | None:
    """Tokenize a canonical preference row; None if truncation left it unusable.

    Truncation rules (documented in the README):
    * when prompt + the longer response exceeds ``max_length``, the prompt is cut from the
      left to ``max_prompt_length`` tokens (its end, next to the response, is kept);
    * responses are then cut to ``max_length - len(prompt)`` tokens, keeping their start;
    * a pair whose responses lose every trainable token, or become identical, is dropped
      and counted in ``stats``.
    """
    source, r = row.get("source", "?"), row.get("row", -1)
    c_ids, c_lab, c_np = _response_tokens(tokenizer, row["prompt"], row["chosen"], source, r)
    r_ids, r_lab, r_np = _response_tokens(tokenizer, row["prompt"], row["rejected"], source, r)
    # the shared prefix: identical leading tokens inside both prompts
    n = 0
    lim = min(c_np, r_np)
    while n < lim and c_ids[n] == r_ids[n]:
        n += 1
    prompt = c_ids[:n]
    c_ids, c_lab, r_ids, r_lab = c_ids[n:], c_lab[n:], r_ids[n:], r_lab[n:]
    for name, lab in (("chosen", c_lab), ("rejected", r_lab)):
        if not any(x != IGNORE for x in lab):
            raise DataError("response has no trainable token after rendering with the chat "
                            "template", source=source, row=r, field=name)
    truncated = False
    if len(prompt) + max(len(c_ids), len(r_ids)) > max_length:
        truncated = True
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
        room = max(max_length - len(prompt), 0)
        c_ids, c_lab, r_ids, r_lab = c_ids[:room], c_lab[:room], r_ids[:room], r_lab[:room]
    pair = TokenizedPair(prompt, c_ids, c_lab, r_ids, r_lab, source, r)
    if stats is not None and truncated:
        stats.truncated += 1
    reason = None
    if not prompt or pair.num_chosen == 0 or pair.num_rejected == 0:
        reason = "empty after truncation"
    elif c_ids == r_ids:
        reason = "chosen and rejected identical after truncation"
    if reason:
        if stats is not None:
            if reason.startswith("empty"):
                stats.dropped_empty += 1
            else:
                stats.dropped_identical += 1
            if len(stats.dropped) < 20:
                stats.dropped.append((source, r, reason))
        return None
    if stats is not None:
        stats.kept += 1
    return pair
