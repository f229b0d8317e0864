"""Every assistant token trained with real tokenizers and real rows, whatever the offsets.

The GPT-2 BPE of ``realdata/tokenizers/gpt2`` reports full offsets; switching its
post-processor's ``trim_offsets`` on gives the offsets of the GPT-NeoX/Pythia family, where a
token made of spaces reports a zero-width span ``(a, a)``. Labels must not depend on that.
"""

from __future__ import annotations

import pytest

from conftest import CHATML, realdata
from starpo.data.tokenize import (IGNORE, _labels_from_offsets, assistant_char_spans, encode,
                                  render, tokenize_conversation, tokenize_pair)

EOT = "<|im_end|>"

# responses whose whitespace is the point: indentation, double spaces, tabs, trailing
# spaces, blank lines (message contents are kept as they are: no string format strips them)
WHITESPACE_RESPONSES = [
    "def f(x):\n    if x:\n        return  x\n\n\n    return 0\n",
    "Sure.  Here is a list:\n\n  - one\n  - two  \n\n\tand a tab\t\there.",
    "trailing spaces   ",
    "a\n\n\n\nb",
    "```python\nfor i in range(3):\n\tprint(i)   # tab indented\n```\n\n",
    "x  y   z    w",
]


def _gpt2(trim: bool):
    from tokenizers import processors
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(realdata("tokenizers", "gpt2")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", EOT]})
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim)
    return tok


@pytest.fixture(scope="module")
def trimmed():
    return _gpt2(True)


@pytest.fixture(scope="module")
def full():
    return _gpt2(False)


@pytest.fixture(scope="module")
def hh_rows():
    from starpo.recipe import SourceSpec
    from starpo.data.sources import load_source
    return load_source(SourceSpec(path=str(realdata("hh_rlhf.jsonl"))), "preference")


def _trained(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def _assistant_text(messages, untrained=()) -> str:
    return "".join(m["content"] + EOT for i, m in enumerate(messages)
                   if m["role"] == "assistant" and i not in untrained)


def _raw_offsets(tok, text):
    """Offsets exactly as the tokenizer reports them (trimmed when it trims)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _old_rule(ids, offsets, spans):
    """The overlap rule for tokens with a width (what labels were before zero-width tokens
    were placed): the oracle for tokenizers that report full offsets."""
    out = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(offsets):
        if b > a and any(b > s and a < e for s, e in spans):
            out[k] = ids[k]
    return out


def test_the_trimmed_tokenizer_reports_zero_width_space_tokens(trimmed, full):
    # the setting of the bug: same ids, but runs of spaces report (a, a)
    text = "<|im_start|>assistant\nx  y<|im_end|>\n"
    ids_t, off_t = _raw_offsets(trimmed, text)
    ids_f, off_f = _raw_offsets(full, text)
    assert ids_t == ids_f
    assert any(a == b for a, b in off_t) and not any(a == b for a, b in off_f)


def test_real_hh_rlhf_sft_trains_every_assistant_token(trimmed, full, hh_rows):
    assert len(hh_rows) == 30
    double_spaced = 0
    for r in hh_rows:
        msgs = r["prompt"] + r["chosen"]
        double_spaced += any("  " in m["content"] for m in msgs if m["role"] == "assistant")
        t = tokenize_conversation(trimmed, msgs, source=r["source"], row=r["row"])
        # one tokenization, ids as a plain encode gives them
        assert t.input_ids == trimmed(render(trimmed, msgs), add_special_tokens=False)["input_ids"]
        assert _trained(trimmed, t.input_ids, t.labels) == _assistant_text(msgs), r["row"]
        assert t.labels == tokenize_conversation(full, msgs).labels
    assert double_spaced >= 10   # the rows hold the whitespace this test is about


def test_real_hh_rlhf_pairs_train_both_whole_responses(trimmed, full, hh_rows):
    for r in hh_rows:
        p = tokenize_pair(trimmed, r, max_length=10**6, max_prompt_length=10**6)
        for side in ("chosen", "rejected"):
            ids, labels = getattr(p, f"{side}_ids"), getattr(p, f"{side}_labels")
            assert _trained(trimmed, ids, labels) == r[side][0]["content"] + EOT, (r["row"], side)
        q = tokenize_pair(full, r, max_length=10**6, max_prompt_length=10**6)
        assert p.as_dict() == q.as_dict()


@pytest.mark.parametrize("response", WHITESPACE_RESPONSES)
def test_whitespace_in_responses_is_trained(trimmed, hh_rows, response):
    prompt = hh_rows[0]["prompt"]          # a real multi-line HH-RLHF prompt
    msgs = prompt + [{"role": "assistant", "content": response}]
    t = tokenize_conversation(trimmed, msgs)
    assert _trained(trimmed, t.input_ids, t.labels) == _assistant_text(msgs)
    other = WHITESPACE_RESPONSES[(WHITESPACE_RESPONSES.index(response) + 1)
                                 % len(WHITESPACE_RESPONSES)]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": response}],
           "rejected": [{"role": "assistant", "content": other}], "source": "s", "row": 0}
    p = tokenize_pair(trimmed, row, max_length=10**6, max_prompt_length=10**6)
    assert _trained(trimmed, p.chosen_ids, p.chosen_labels) == response + EOT
    assert _trained(trimmed, p.rejected_ids, p.rejected_labels) == other + EOT


def test_multi_turn_whitespace_and_untrained_turns(trimmed):
    msgs = [{"role": "system", "content": "Answer  in code."},
            {"role": "user", "content": "Indent it."},
            {"role": "assistant", "content": "  two leading spaces\n    and four"},
            {"role": "user", "content": "Again  please."},
            {"role": "assistant", "content": "\tok  \n\n"}]
    t = tokenize_conversation(trimmed, msgs)
    assert _trained(trimmed, t.input_ids, t.labels) == _assistant_text(msgs)
    t = tokenize_conversation(trimmed, msgs, untrained=[2])
    assert _trained(trimmed, t.input_ids, t.labels) == "\tok  \n\n" + EOT


def test_zero_width_tokens_are_placed_by_their_neighbours(trimmed, full, hh_rows):
    """The labelling rule alone, fed the trimmed offsets as reported, gives the labels of
    the full offsets (other conventions that leave zero-width tokens get the same care)."""
    convs = [r["prompt"] + r["chosen"] for r in hh_rows] + [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": resp}]
        for resp in WHITESPACE_RESPONSES]
    zero_width = 0
    for msgs in convs:
        text, spans = assistant_char_spans(trimmed, msgs)
        ids, raw = _raw_offsets(trimmed, text)
        zero_width += sum(1 for a, b in raw if a == b)
        ids_f, off_f = encode(full, text)
        assert ids == ids_f
        assert _labels_from_offsets(ids, raw, spans) == _labels_from_offsets(ids, off_f, spans)
    assert zero_width > 50


def test_point_tokens_at_span_boundaries():
    spans = [(2, 5)]
    ids = [10, 11, 12, 13, 14, 15]
    # zero-width tokens with nothing before them: points; a point at a turn's start is in
    # it, at its end it is not
    offsets = [(0, 2), (2, 2), (2, 4), (4, 5), (5, 5), (5, 7)]
    assert _labels_from_offsets(ids, offsets, spans) == [IGNORE, 11, 12, 13, IGNORE, IGNORE]
    # a zero-width token after a gap stands for the gap: before the turn / inside it
    offsets = [(0, 1), (2, 2), (2, 4), (5, 5), (5, 7)]
    assert _labels_from_offsets(ids[:5], offsets, spans) == [IGNORE, IGNORE, 12, 13, IGNORE]
    # a token straddling a boundary is trained whole; one touching it from outside is not
    assert _labels_from_offsets([1, 2, 3], [(0, 3), (3, 5), (5, 8)], spans) == [1, 2, IGNORE]


def test_full_offset_tokenizers_keep_their_labels(world_tokenizer, full, hh_rows):
    """Tokenizers that report full offsets (the quickstart's, GPT-2 as shipped) get exactly
    the labels of the overlap rule: placing zero-width tokens changes nothing for them."""
    from starpo.world import World
    convs = [r["messages"] for r in World(0).sft_rows(300)]
    for tok, cs in ((world_tokenizer, convs), (full, [r["prompt"] + r["chosen"] for r in hh_rows])):
        for msgs in cs:
            text, spans = assistant_char_spans(tok, msgs)
            ids, offsets = encode(tok, text)
            assert _raw_offsets(tok, text) == (ids, offsets)   # nothing was untrimmed
            assert _labels_from_offsets(ids, offsets, spans) == _old_rule(ids, offsets, spans)


def test_encode_leaves_the_tokenizer_as_it_was(trimmed):
    from tokenizers import processors
    before = trimmed.backend_tokenizer.post_processor.__getstate__()
    ids, offsets = encode(trimmed, "a  b")
    assert trimmed.backend_tokenizer.post_processor.__getstate__() == before
    assert _raw_offsets(trimmed, "a  b")[1] != offsets         # still trims outside encode
    assert ids == trimmed("a  b", add_special_tokens=False)["input_ids"]
    assert offsets == [(0, 1), (1, 2), (2, 4)]
    # trimming nested in a Sequence (as Llama-3-style tokenizers carry it) is found too
    tok = _gpt2(False)
    tok.backend_tokenizer.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=True)])
    assert encode(tok, "a  b")[1] == [(0, 1), (1, 2), (2, 4)]
